// streamsnap console: live progress of running operations (progressive enhancement; every
// page reads fine without it). Elements with data-status-url whose state is not final are
// polled every second; when one finishes the page is reloaded so buttons and artifacts match.
(function () {
  "use strict";
  var FINAL = { Succeeded: 1, Failed: 1, Canceled: 1 };
  function stateOf(el) {
    var badge = el.querySelector("[data-state]");
    return badge ? badge.getAttribute("data-state") : "";
  }
  function update(el, s) {
    var badge = el.querySelector("[data-state]");
    if (badge && badge.getAttribute("data-state") !== s.state) {
      badge.setAttribute("data-state", s.state);
      badge.className = "badge state-" + s.state;
      badge.textContent = s.state;
    }
    var bar = el.querySelector(".op-progress progress");
    if (bar) { bar.value = s.percent; }
    var text = el.querySelector(".op-progress .progress-text");
    if (text) { text.textContent = s.progress; }
    var error = el.querySelector(".op-error");
    if (error) { error.textContent = s.error; }
  }
  function poll(el) {
    var url = el.getAttribute("data-status-url");
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
      .then(function (s) {
        update(el, s);
        if (s.terminal) {
          var cancels = el.querySelectorAll("form[action$='/cancel']");
          for (var i = 0; i < cancels.length; i++) { cancels[i].remove(); }
          setTimeout(function () { window.location.reload(); }, 500);
        } else {
          setTimeout(function () { poll(el); }, 1000);
        }
      })
      .catch(function () { /* logged out or gone: stop; a reload shows why */ });
  }
  document.addEventListener("DOMContentLoaded", function () {
    var els = document.querySelectorAll("[data-status-url]");
    for (var i = 0; i < els.length; i++) {
      if (!FINAL[stateOf(els[i])]) { poll(els[i]); }
    }
  });
})();
