{{/* The conversion service's objects: RELEASE-streamsnap-conversion-service (or
RELEASE-conversion-service when the release name holds the chart's). */}}
{{- define "streamsnap.conversionService.name" -}}
{{- printf "%s-conversion-service" (include "streamsnap.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Its own app.kubernetes.io/name: the DaemonSet and the metrics Service select the pods
named after the chart, and must not take these. */}}
{{- define "streamsnap.conversionService.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-conversion-service
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "streamsnap.conversionService.podLabels" -}}
{{ include "streamsnap.conversionService.selectorLabels" . }}
app.kubernetes.io/component: conversion-service
app.kubernetes.io/part-of: {{ .Chart.Name }}
{{- end -}}

{{- define "streamsnap.conversionService.labels" -}}
{{ include "streamsnap.conversionService.podLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Secret holding the API token and the webhook secret. */}}
{{- define "streamsnap.conversionService.secretName" -}}
{{- .Values.conversionService.existingSecret | default (include "streamsnap.conversionService.name" .) -}}
{{- end -}}

{{/* The Secret holding the PostgreSQL password. */}}
{{- define "streamsnap.conversionService.storeSecretName" -}}
{{- .Values.conversionService.store.existingSecret | default (printf "%s-postgres" (include "streamsnap.conversionService.name" .)) -}}
{{- end -}}
