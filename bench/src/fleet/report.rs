//! The fleet's figures: one line per variant (medians over runs with min/max), the ratios to
//! one node's egress, and the paper model for a large fleet fed with the measured figures.

use super::mirror::ChunkBytes;
use super::node::NodeStart;
use super::{Args, ProfileSetting, Variant};

const MB: f64 = 1e6;

/// One start of one variant.
#[derive(Debug, Default)]
pub struct FleetRun {
    pub nodes: Vec<NodeStart>,
    /// Bytes the origin's link carried to its clients from the start to the last node ready.
    pub egress_start: u64,
    /// The same until the mirror stored every blob it was asked for (no mirror: the same).
    pub egress_total: u64,
    /// The warm-up before the start: bytes the origin's link carried, and its time.
    pub warmup_egress: u64,
    pub warmup_s: f64,
    /// How long the mirror's fill ran on after the last node was ready.
    pub fill_wait_s: f64,
    /// The machine's load average when the start began, and the share of its CPU time busy
    /// during the start (2 cores, shared with whatever else runs).
    pub load: f64,
    pub cpu_busy: f64,
    /// Bytes the mirror's link carried to the nodes.
    pub mirror_link_bytes: u64,
    /// Data blob bytes by the origin's and by the mirror's access log.
    pub origin: ChunkBytes,
    pub mirror: ChunkBytes,
    /// The slice cache: chunk bytes of the reads whose first slice was a cache hit.
    pub cache_hit_bytes: u64,
}

impl FleetRun {
    fn ready_s(&self) -> Vec<f64> {
        self.nodes.iter().map(|n| n.ready.as_secs_f64()).collect()
    }

    pub fn median_ready(&self) -> f64 {
        median(&self.ready_s())
    }

    pub fn worst_ready(&self) -> f64 {
        self.ready_s().into_iter().fold(0.0, f64::max)
    }

    /// What the run cost the origin, the warm-up included.
    pub fn total_egress(&self) -> f64 {
        (self.egress_total + self.warmup_egress) as f64
    }

    /// Chunk bytes the mirror served over all chunk bytes the nodes received as `206`.
    pub fn hit_ratio(&self) -> f64 {
        let all = self.mirror.to_nodes + self.origin.to_nodes;
        if all == 0 {
            0.0
        } else {
            self.mirror.to_nodes as f64 / all as f64
        }
    }

    fn sum(&self, f: impl Fn(&NodeStart) -> f64) -> f64 {
        self.nodes.iter().map(f).sum()
    }

    pub fn one_line(&self) -> String {
        format!(
            "ready median {:.2} s, worst {:.2} s (pulled median {:.2} s); egress {:.1} MB ({:.1} MB by the last ready, \
             warm-up {:.1} MB in {:.1} s, fill ran {:.1} s on); mirror link {:.1} MB; chunk \
             bytes from the origin {:.1} MB (+{:.1} MB whole-blob answers to nodes, {:.1} MB to \
             the mirror), from the mirror {:.1} MB (+{:.1} MB whole-blob answers), hit ratio \
             {:.0}% (slice cache: {:.1} MB of reads starting in a cached slice); range_ignored \
             {:.0}, prefetched {:.1} MB, node range bytes {:.1} MB; load {:.1}, CPU busy {:.0}%",
            self.median_ready(),
            self.worst_ready(),
            median(
                &self
                    .nodes
                    .iter()
                    .map(|n| n.pulled.as_secs_f64())
                    .collect::<Vec<_>>()
            ),
            self.egress_total as f64 / MB,
            self.egress_start as f64 / MB,
            self.warmup_egress as f64 / MB,
            self.warmup_s,
            self.fill_wait_s,
            self.mirror_link_bytes as f64 / MB,
            self.origin.to_nodes as f64 / MB,
            self.origin.whole_to_nodes as f64 / MB,
            self.origin.to_others as f64 / MB,
            self.mirror.to_nodes as f64 / MB,
            self.mirror.whole_to_nodes as f64 / MB,
            100.0 * self.hit_ratio(),
            self.cache_hit_bytes as f64 / MB,
            self.sum(|n| n.range_ignored),
            self.sum(|n| n.prefetch_bytes) / MB,
            self.sum(|n| n.range_bytes) / MB,
            self.load,
            100.0 * self.cpu_busy,
        )
    }
}

/// Every run, by profile setting and variant.
pub struct Results {
    nodes: usize,
    runs: usize,
    mbit: f64,
    rtt_ms: f64,
    mirror_mbit: f64,
    mirror_rtt_ms: f64,
    slice: String,
    model_nodes: u64,
    model_zones: u64,
    image_bytes: u64,
    data_bytes: u64,
    runs_by: Vec<(ProfileSetting, Variant, Vec<FleetRun>)>,
    pub elapsed_s: f64,
}

impl Results {
    pub fn new(args: &Args, image_bytes: u64, data_bytes: u64) -> Self {
        Self {
            nodes: args.nodes,
            runs: args.runs,
            mbit: args.mbit,
            rtt_ms: args.rtt_ms,
            mirror_mbit: args.mirror_mbit,
            mirror_rtt_ms: args.mirror_rtt_ms,
            slice: args.slice.clone(),
            model_nodes: args.model_nodes,
            model_zones: args.model_zones,
            image_bytes,
            data_bytes,
            runs_by: Vec::new(),
            elapsed_s: 0.0,
        }
    }

    pub fn push(&mut self, profile: ProfileSetting, variant: Variant, run: FleetRun) {
        match self
            .runs_by
            .iter_mut()
            .find(|(p, v, _)| *p == profile && *v == variant)
        {
            Some((_, _, runs)) => runs.push(run),
            None => self.runs_by.push((profile, variant, vec![run])),
        }
    }

    fn runs(&self, profile: ProfileSetting, variant: Variant) -> Option<&[FleetRun]> {
        self.runs_by
            .iter()
            .find(|(p, v, _)| *p == profile && *v == variant)
            .map(|(_, _, r)| r.as_slice())
    }

    /// Median over runs of `f`.
    fn med(&self, p: ProfileSetting, v: Variant, f: impl Fn(&FleetRun) -> f64) -> Option<f64> {
        self.runs(p, v)
            .map(|runs| median(&runs.iter().map(f).collect::<Vec<_>>()))
    }

    pub fn print(&self) {
        println!();
        println!(
            "fleet: {} nodes, {} runs each; origin link {:.0} Mbit/s, {:.0} ms RTT; mirror link \
             {:.0} Mbit/s, {} ms RTT; slice cache: {} slices; image {:.0} MB compressed ({:.0} MB \
             of data blobs); took {:.0} s",
            self.nodes,
            self.runs,
            self.mbit,
            self.rtt_ms,
            self.mirror_mbit,
            self.mirror_rtt_ms,
            self.slice,
            self.image_bytes as f64 / MB,
            self.data_bytes as f64 / MB,
            self.elapsed_s
        );
        println!(
            "{:<8} {:<34} {:>5} {:>20} {:>20} {:>20} {:>9} {:>20} {:>7} {:>12} {:>9}",
            "profile",
            "variant",
            "nodes",
            "ready median s",
            "ready worst s",
            "egress start MB",
            "warm-up",
            "egress total MB",
            "x one",
            "mirror hit %",
            "CPU busy"
        );
        for &(profile, variant, ref runs) in &self.runs_by {
            let one = self.med(profile, Variant::Single, FleetRun::total_egress);
            let of = |f: &dyn Fn(&FleetRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
            let total = of(&|r| r.total_egress() / MB);
            let hit = if variant.mirrored() {
                span(&of(&|r| 100.0 * r.hit_ratio()), 0)
            } else {
                "-".into()
            };
            let warmup = if variant == Variant::Warm {
                format!("{:.0}", median(&of(&|r| r.warmup_egress as f64 / MB)))
            } else {
                "-".into()
            };
            println!(
                "{:<8} {:<34} {:>5} {:>20} {:>20} {:>20} {:>9} {:>20} {:>7} {:>12} {:>9}",
                format!("{profile:?}").to_lowercase(),
                variant.label(),
                runs[0].nodes.len(),
                span(&of(&FleetRun::median_ready), 2),
                span(&of(&FleetRun::worst_ready), 2),
                span(&of(&|r| r.egress_total as f64 / MB), 1),
                warmup,
                span(&total, 1),
                one.map_or("-".into(), |one| format!(
                    "{:.2}",
                    median(&total) * MB / one
                )),
                hit,
                format!("{:.0}%", 100.0 * median(&of(&|r| r.cpu_busy))),
            );
        }
        for profile in [ProfileSetting::With, ProfileSetting::Without] {
            self.print_model(profile);
        }
    }

    /// The paper model for `model_nodes` nodes in `model_zones` zones (one mirror each), with
    /// this profile setting's measured figures as inputs.
    fn print_model(&self, p: ProfileSetting) {
        let (Some(one), Some(t_one)) = (
            self.med(p, Variant::Single, FleetRun::total_egress),
            self.med(p, Variant::Single, FleetRun::median_ready),
        ) else {
            return;
        };
        let n = self.nodes as f64;
        let link = self.mbit * 1e6 / 8.0;
        let mirror_link = self.mirror_mbit * 1e6 / 8.0;
        let (k, z) = (self.model_nodes as f64, self.model_zones as f64);
        println!();
        println!(
            "model, {:?} profile: {k:.0} nodes, {z:.0} zones (one mirror each); origin link {:.0} \
             MB/s, mirror link {:.0} MB/s",
            p,
            link / MB,
            mirror_link / MB
        );
        println!(
            "  inputs: one node alone: {:.1} MB from the origin, ready in {t_one:.2} s",
            one / MB
        );
        // Without a mirror every node's bytes cross the origin's link.
        let none_last = t_one + k * one / link;
        println!(
            "  no mirror: egress {:.1} GB ({k:.0} x one node); last node ready <= {none_last:.0} \
             s (one node's time + everyone's bytes over the origin link){}",
            k * one / 1e9,
            self.med(p, Variant::None, FleetRun::worst_ready)
                .map_or(String::new(), |w| format!(
                    "; the same formula at {n:.0} nodes: {:.2} s, measured worst {w:.2} s",
                    t_one + n * one / link
                ))
        );
        if let (Some(fill), Some(residual), Some(from_mirror), Some(t_warm)) = (
            self.med(p, Variant::Warm, |r| r.warmup_egress as f64),
            self.med(p, Variant::Warm, |r| r.egress_total as f64 / n),
            self.med(p, Variant::Warm, |r| r.mirror_link_bytes as f64 / n),
            self.med(p, Variant::Warm, FleetRun::median_ready),
        ) {
            let egress = z * fill + k * residual;
            let warmup = z * fill / link;
            let per_mirror = k / z;
            let last = t_warm + (k * residual / link).max(per_mirror * from_mirror / mirror_link);
            println!(
                "  warmed mirrors: inputs: warm-up {:.1} MB per mirror, {:.2} MB per node still \
                 from the origin, {:.1} MB per node from the mirror, ready in {t_warm:.2} s \
                 (median at {n:.0} nodes)",
                fill / MB,
                residual / MB,
                from_mirror / MB
            );
            println!(
                "  warmed mirrors: egress {:.1} GB ({:.2} x one node, {:.1}% of no mirror); \
                 warm-up {warmup:.0} s over the origin link (all zones), before the rollout; \
                 each mirror serves {per_mirror:.0} nodes {:.1} GB; last node ready <= {last:.0} \
                 s after the rollout starts",
                egress / 1e9,
                egress / one,
                100.0 * egress / (k * one),
                per_mirror * from_mirror / 1e9
            );
        }
        if let (Some(total), Some(fill), Some(from_mirror), Some(t_slice)) = (
            self.med(p, Variant::Slice, |r| r.egress_total as f64),
            self.med(p, Variant::Slice, |r| r.origin.to_others as f64),
            self.med(p, Variant::Slice, |r| r.mirror_link_bytes as f64 / n),
            self.med(p, Variant::Slice, FleetRun::median_ready),
        ) {
            // What a node still takes from the origin itself: metadata (egress minus the
            // cache's slice fetches).
            let residual = (total - fill).max(0.0) / n;
            let egress = z * fill + k * residual;
            let per_mirror = k / z;
            // The measured start paid one zone's fill over the origin link; the other zones'
            // fills and every node's metadata share it too.
            let last = t_slice
                + (((z - 1.0) * fill + k * residual) / link)
                    .max(per_mirror * from_mirror / mirror_link);
            println!(
                "  cold slice caches, everyone at once: inputs: {:.1} MB of slices per cache \
                 (fetched during the start), {:.2} MB per node still from the origin, {:.1} MB \
                 per node from the cache, ready in {t_slice:.2} s (median at {n:.0} nodes)",
                fill / MB,
                residual / MB,
                from_mirror / MB
            );
            println!(
                "  cold slice caches: egress {:.1} GB ({:.2} x one node, {:.1}% of no mirror); \
                 no warm-up; each cache serves {per_mirror:.0} nodes {:.1} GB; last node ready \
                 <= {last:.0} s after the rollout starts",
                egress / 1e9,
                egress / one,
                100.0 * egress / (k * one),
                per_mirror * from_mirror / 1e9
            );
        }
        if let Some(cold) = self.med(p, Variant::Cold, |r| r.egress_total as f64) {
            let fill = self.data_bytes as f64;
            let per_node = (cold - fill).max(0.0) / n;
            println!(
                "  cold mirrors, everyone at once: {:.1} MB per node still from the origin at \
                 {n:.0} nodes (egress minus one fill of the data blobs): at {k:.0} nodes about \
                 {:.1} GB ({:.0}% of no mirror), the first wave goes to the origin",
                per_node / MB,
                (z * fill + k * per_node) / 1e9,
                100.0 * (z * fill + k * per_node) / (k * one)
            );
        }
    }
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Median, min, max.
fn mmm(v: &[f64]) -> (f64, f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(v), lo, hi)
}

/// `median [min..max]` with `digits` decimals.
fn span(v: &[f64], digits: usize) -> String {
    let (m, lo, hi) = mmm(v);
    format!("{m:.digits$} [{lo:.digits$}..{hi:.digits$}]")
}
