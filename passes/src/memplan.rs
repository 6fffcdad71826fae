//! Memory plan (design.md pipeline: "kernel partition → memory plan"): every intermediate
//! buffer of a [`KernelPlan`] gets an offset in one arena, reusing the space of buffers that
//! are dead by the time it is written.
//!
//! Liveness is over the kernel order: a buffer is live from the kernel that first writes it to
//! the last kernel that reads it, both inclusive (so a kernel's inputs and outputs never share
//! memory: no kernel works in place). Inputs, states, parameters and graph outputs belong to
//! the caller and are outside the arena. A scan kernel needs scratch space while it runs: its
//! body's own arena plus one more copy of each carry (the runtime alternates the two copies
//! between steps; the final carry lands in the scan's output buffer).
//!
//! Placement is greedy best fit, biggest buffers first: a buffer goes into the smallest gap
//! between the buffers already placed that are live at the same time, or on top of them.
//! Offsets and sizes are multiples of [`ALIGN`].

use ir::kernel::{BufferId, KernelKind, KernelPlan};
use ir::shape::DimEnv;

/// Alignment of every arena offset and size, in bytes.
pub const ALIGN: u64 = 256;

/// What occupies a placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// An intermediate buffer.
    Buffer(BufferId),
    /// The scratch space of the scan kernel at this position of `KernelPlan::kernels`.
    Scratch { kernel: usize },
}

/// Where a slot lives in the arena and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub slot: Slot,
    /// Byte offset in the arena (a multiple of [`ALIGN`]).
    pub offset: u64,
    /// Bytes reserved (the exact size rounded up to [`ALIGN`]).
    pub size: u64,
    /// Exact size in bytes.
    pub bytes: u64,
    /// First and last kernel (positions in `KernelPlan::kernels`) during which it is live.
    pub first: usize,
    pub last: usize,
}

impl Placement {
    fn live_with(&self, o: &Placement) -> bool {
        self.first <= o.last && o.first <= self.last
    }
}

/// The arena layout of one kernel plan under one binding of the symbolic dims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The arena's size: the most bytes live at once, with fragmentation and alignment.
    pub arena_peak_bytes: u64,
    /// One per arena slot, in placement order (biggest first).
    pub placements: Vec<Placement>,
    /// Bytes of the buffers outside the arena (inputs, states, parameters, graph outputs).
    pub external_bytes: u64,
    /// The plans of scan bodies (kernel position, plan): offsets relative to the start of
    /// that scan's scratch placement.
    pub nested: Vec<(usize, MemoryPlan)>,
}

impl MemoryPlan {
    /// The arena offset of an intermediate buffer.
    pub fn offset(&self, b: BufferId) -> Option<u64> {
        self.placements
            .iter()
            .find(|p| p.slot == Slot::Buffer(b))
            .map(|p| p.offset)
    }

    pub fn placement(&self, b: BufferId) -> Option<&Placement> {
        self.placements.iter().find(|p| p.slot == Slot::Buffer(b))
    }

    /// Checks by brute force that no two slots live at the same time overlap, that every
    /// slot is aligned, big enough and inside the arena; nested plans too.
    pub fn check(&self) -> Result<(), String> {
        for p in &self.placements {
            if p.offset % ALIGN != 0 || p.size % ALIGN != 0 || p.size < p.bytes {
                return Err(format!("{:?}: misaligned or too small placement {p:?}", p.slot));
            }
            if p.offset + p.size > self.arena_peak_bytes {
                return Err(format!(
                    "{:?} ends past the arena's {} bytes",
                    p.slot, self.arena_peak_bytes
                ));
            }
        }
        for (i, a) in self.placements.iter().enumerate() {
            for b in &self.placements[i + 1..] {
                let disjoint = a.offset + a.size <= b.offset || b.offset + b.size <= a.offset;
                if a.size > 0 && b.size > 0 && a.live_with(b) && !disjoint {
                    return Err(format!("{:?} and {:?} are live together and overlap", a.slot, b.slot));
                }
            }
        }
        for (k, nested) in &self.nested {
            nested.check().map_err(|e| format!("scan kernel {k}: {e}"))?;
            let scratch = self
                .placements
                .iter()
                .find(|p| p.slot == Slot::Scratch { kernel: *k })
                .ok_or_else(|| format!("scan kernel {k} has no scratch placement"))?;
            if nested.arena_peak_bytes > scratch.size {
                return Err(format!("scan kernel {k}: body arena exceeds its scratch"));
            }
        }
        Ok(())
    }
}

fn align(bytes: u64) -> Result<u64, String> {
    bytes
        .checked_next_multiple_of(ALIGN)
        .ok_or_else(|| format!("{bytes} bytes overflow the arena"))
}

/// Lay out the arena of `plan` under the dims in `env`. Fails when a buffer's size cannot be
/// evaluated (a dim without value) or overflows.
pub fn plan(plan: &KernelPlan, env: &DimEnv) -> Result<MemoryPlan, String> {
    // liveness of arena slots: first write .. last read
    let mut live: Vec<Option<(usize, usize)>> = vec![None; plan.buffers.len()];
    let mut touch = |b: BufferId, k: usize| {
        if let Some(l) = live.get_mut(b.0 as usize) {
            *l = Some(match *l {
                None => (k, k),
                Some((f, t)) => (f.min(k), t.max(k)),
            });
        }
    };
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for r in kernel.inputs.iter().chain(&kernel.outputs) {
            touch(r.buffer, k);
        }
    }
    let mut slots = Vec::new();
    let mut external_bytes = 0u64;
    for (i, b) in plan.buffers.iter().enumerate() {
        let bytes = b.size_bytes(env).map_err(|e| format!("buffer {}: {e}", b.name))?;
        if !b.kind.in_arena() {
            external_bytes = external_bytes.saturating_add(bytes);
            continue;
        }
        if let Some((first, last)) = live[i] {
            slots.push(Placement {
                slot: Slot::Buffer(BufferId(i as u32)),
                offset: 0,
                size: align(bytes)?,
                bytes,
                first,
                last,
            });
        }
    }
    let mut nested = Vec::new();
    for (k, kernel) in plan.kernels.iter().enumerate() {
        if let KernelKind::Scan(s) = &kernel.kind {
            let body = self::plan(&s.body, env).map_err(|e| format!("scan kernel {}: {e}", kernel.name))?;
            let mut carries = 0u64;
            for o in s.body.outputs.iter().take(s.n_carry) {
                if let Some(b) = s.body.buffer(o.buffer) {
                    carries = carries.saturating_add(align(b.size_bytes(env)?)?);
                }
            }
            let bytes = body.arena_peak_bytes.saturating_add(carries);
            slots.push(Placement {
                slot: Slot::Scratch { kernel: k },
                offset: 0,
                size: align(bytes)?,
                bytes,
                first: k,
                last: k,
            });
            nested.push((k, body));
        }
    }
    // biggest first; ties by first use, then slot, so the plan is deterministic
    slots.sort_by(|a, b| {
        b.size
            .cmp(&a.size)
            .then(a.first.cmp(&b.first))
            .then(a.slot.cmp(&b.slot))
    });
    let mut placed: Vec<Placement> = Vec::with_capacity(slots.len());
    let mut peak = 0u64;
    for mut s in slots {
        s.offset = best_fit(&placed, &s);
        peak = peak.max(s.offset + s.size);
        placed.push(s);
    }
    Ok(MemoryPlan {
        arena_peak_bytes: peak,
        placements: placed,
        external_bytes,
        nested,
    })
}

/// The offset of the smallest gap that fits `s` among the placed slots live at the same time
/// (lowest offset on ties), or the top of them.
fn best_fit(placed: &[Placement], s: &Placement) -> u64 {
    let mut busy: Vec<(u64, u64)> = placed
        .iter()
        .filter(|p| p.size > 0 && p.live_with(s))
        .map(|p| (p.offset, p.offset + p.size))
        .collect();
    busy.sort_unstable();
    let mut best: Option<(u64, u64)> = None; // (gap size, offset)
    let mut cursor = 0u64;
    for (start, end) in busy {
        if start > cursor {
            let gap = start - cursor;
            if gap >= s.size && best.is_none_or(|(g, _)| gap < g) {
                best = Some((gap, cursor));
            }
        }
        cursor = cursor.max(end);
    }
    best.map(|(_, o)| o).unwrap_or(cursor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::tests::{dsl, ring_graph};
    use crate::partition::{partition, partition_unfused_count};
    use std::collections::HashSet;

    fn env(pairs: &[(&str, i64)]) -> DimEnv {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    /// Independent of `MemoryPlan::check`: liveness recomputed from the kernels, then every
    /// pair of arena buffers live at the same kernel must not overlap. Also the peak bounds.
    fn brute_force(plan: &KernelPlan, mp: &MemoryPlan, env: &DimEnv) {
        mp.check().unwrap();
        let arena: Vec<BufferId> = (0..plan.buffers.len() as u32)
            .map(BufferId)
            .filter(|b| plan.buffers[b.0 as usize].kind.in_arena())
            .collect();
        for k in 0..plan.kernels.len() {
            let touched = |b: BufferId, range: std::ops::RangeInclusive<usize>| {
                plan.kernels[range]
                    .iter()
                    .any(|kk| kk.inputs.iter().chain(&kk.outputs).any(|r| r.buffer == b))
            };
            let written_before = |b: BufferId| {
                plan.kernels[..=k]
                    .iter()
                    .any(|kk| kk.outputs.iter().any(|r| r.buffer == b))
            };
            let live: Vec<BufferId> = arena
                .iter()
                .copied()
                .filter(|&b| written_before(b) && touched(b, k..=plan.kernels.len() - 1))
                .collect();
            for (i, &a) in live.iter().enumerate() {
                for &b in &live[i + 1..] {
                    let (pa, pb) = (mp.placement(a).unwrap(), mp.placement(b).unwrap());
                    let (ea, eb) = (pa.offset + pa.bytes, pb.offset + pb.bytes);
                    let disjoint = ea <= pb.offset || eb <= pa.offset || pa.bytes == 0 || pb.bytes == 0;
                    assert!(
                        disjoint,
                        "kernel {k}: {} and {} overlap",
                        plan.buffers[a.0 as usize].name, plan.buffers[b.0 as usize].name
                    );
                }
            }
        }
        let sizes: Vec<u64> = mp.placements.iter().map(|p| p.size).collect();
        let largest = arena
            .iter()
            .map(|b| plan.buffers[b.0 as usize].size_bytes(env).unwrap())
            .max()
            .unwrap_or(0);
        assert!(mp.arena_peak_bytes >= largest);
        assert!(mp.arena_peak_bytes <= sizes.iter().sum::<u64>());
    }

    #[test]
    fn a_chain_reuses_the_space_of_dead_buffers() {
        let g = dsl("input x: f32[16, 16];
             param w1: f32[16, 16] = \"w1\"; param w2: f32[16, 16] = \"w2\";
             param w3: f32[16, 16] = \"w3\"; param w4: f32[16, 16] = \"w4\";
             let a = x @ w1; let b = a @ w2; let c = b @ w3;
             output \"y\" = c @ w4;");
        let plan = partition(&g).unwrap();
        let mp = super::plan(&plan, &DimEnv::new()).unwrap();
        brute_force(&plan, &mp, &DimEnv::new());
        let offset = |label: &str| {
            let i = plan
                .buffers
                .iter()
                .position(|b| b.name.ends_with(&format!(" {label}")))
                .unwrap();
            mp.offset(BufferId(i as u32)).unwrap()
        };
        assert_eq!(offset("c"), offset("a"));
        assert_ne!(offset("b"), offset("a"));
        assert_eq!(mp.arena_peak_bytes, 2 * 1024);
        // inputs, parameters and outputs are outside: 6 buffers of 1 KiB
        assert_eq!(mp.external_bytes, 6 * 1024);
        let sizes: Vec<u64> = mp.placements.iter().map(|p| p.size).collect();
        assert_eq!(sizes, [1024; 3]);
    }

    #[test]
    fn the_check_finds_overlaps() {
        let p = |slot: u32, offset: u64, first: usize, last: usize| Placement {
            slot: Slot::Buffer(BufferId(slot)),
            offset,
            size: 512,
            bytes: 500,
            first,
            last,
        };
        let mut mp = MemoryPlan {
            arena_peak_bytes: 1024,
            placements: vec![p(0, 0, 0, 1), p(1, 256, 2, 3)],
            ..MemoryPlan::default()
        };
        mp.check().unwrap();
        mp.placements[1].first = 1;
        assert!(mp.check().unwrap_err().contains("overlap"));
        mp.placements[1].offset = 512;
        mp.placements[1].size = 1024;
        assert!(mp.check().unwrap_err().contains("past the arena"));
    }

    #[test]
    fn the_tiny_ring_model_plans_without_overlaps() {
        let g = ring_graph("tiny");
        let plan = partition(&g).unwrap();
        for dims in [
            [("batch", 1), ("seq", 1), ("past", 64)],
            [("batch", 2), ("seq", 32), ("past", 0)],
        ] {
            let e = env(&dims);
            let mp = super::plan(&plan, &e).unwrap();
            brute_force(&plan, &mp, &e);
            assert_eq!(mp.nested.len(), 4);
            let placed: HashSet<Slot> = mp.placements.iter().map(|p| p.slot).collect();
            assert_eq!(placed.len(), mp.placements.len());
        }
        assert!(super::plan(&plan, &env(&[("batch", 1)]))
            .unwrap_err()
            .contains("no value"));
    }

    /// The benchmark figures of the kernel partition and the memory plan for Ring-mini:
    /// `cargo test -p ringjit-passes --release ring_mini_figures -- --ignored --nocapture`.
    #[test]
    #[ignore = "prints the Ring-mini figures (a few seconds)"]
    fn ring_mini_figures() {
        let g = ring_graph("ring-mini-linear-2.0");
        let layers = 20;
        let t = std::time::Instant::now();
        let plan = partition(&g).unwrap();
        let took = t.elapsed();
        let before = partition_unfused_count(&g);
        let c = plan.counts();
        println!(
            "ring-mini-linear-2.0: {} graph nodes, partition in {took:?}",
            g.node_count()
        );
        println!(
            "kernels per decode step: before {before} ({:.2}/layer), after {} ({:.2}/layer)",
            before as f64 / layers as f64,
            c.total,
            c.total as f64 / layers as f64
        );
        println!(
            "  loops {} templates {} scans {} by kind {:?}",
            c.loops, c.templates, c.scans, c.by_kind
        );
        for (what, dims) in [
            ("decode, batch 1, past 4096", [("batch", 1), ("seq", 1), ("past", 4096)]),
            (
                "prefill, batch 1, 4096 tokens",
                [("batch", 1), ("seq", 4096), ("past", 0)],
            ),
        ] {
            let e = env(&dims);
            let mp = super::plan(&plan, &e).unwrap();
            mp.check().unwrap();
            let total: u64 = mp.placements.iter().map(|p| p.size).sum();
            println!(
                "arena peak, {what}: {} bytes ({:.2} MiB; {:.2} MiB if nothing were reused; outside the arena {:.2} GiB)",
                mp.arena_peak_bytes,
                mp.arena_peak_bytes as f64 / (1u64 << 20) as f64,
                total as f64 / (1u64 << 20) as f64,
                mp.external_bytes as f64 / (1u64 << 30) as f64
            );
            for p in mp.placements.iter().take(3) {
                let name = match p.slot {
                    Slot::Buffer(b) => plan
                        .buffer(b)
                        .map(|b| format!("{} {}", b.name, ir::shape::shape_str(&b.shape))),
                    Slot::Scratch { kernel } => Some(format!("scratch of {}", plan.kernels[kernel].name)),
                };
                println!(
                    "    {:>10.2} MiB  {}",
                    p.size as f64 / (1u64 << 20) as f64,
                    name.unwrap_or_default()
                );
            }
        }
    }
}
