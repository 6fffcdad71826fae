//! Graph surgery shared by the passes over the extracted graph (`merge-router-gemm`,
//! `fold-shared-expert`, `fold-qk-norm-step`, `fold-norm-gemm`, `fp8-matmuls`): who reads a
//! value, pointing its readers at another, and numbering the new nodes where the ones they
//! replace stood.

use crate::PassError;
use ir::graph::{Graph, Operand, Value};
use petgraph::stable_graph::NodeIndex;
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use std::collections::{BTreeSet, HashMap};

/// The users of `v` (node, operand slot).
pub(crate) fn users(g: &Graph, v: Value) -> Vec<(NodeIndex, u32)> {
    let mut u: Vec<_> =
        g.g.edges_directed(v.node, Direction::Outgoing)
            .filter(|e| e.weight().port == v.port)
            .map(|e| (e.target(), e.weight().slot))
            .collect();
    u.sort();
    u
}

/// How many ops read `v`, a graph output counting as one more: a pass that replaces `v`'s
/// only reader leaves no second copy of the work behind when this is 1.
pub(crate) fn readers(g: &Graph, v: Value) -> usize {
    users(g, v).len() + g.outputs.iter().filter(|o| o.value == v).count()
}

/// Points every use of the value `old` (one output of its node), edges and graph outputs, at `new`.
pub(crate) fn replace_value(g: &mut Graph, old: Value, new: Value) {
    let uses: Vec<_> =
        g.g.edges_directed(old.node, Direction::Outgoing)
            .filter(|e| e.weight().port == old.port)
            .map(|e| (e.id(), e.target(), e.weight().slot))
            .collect();
    for (e, user, slot) in uses {
        g.g.remove_edge(e);
        g.g.add_edge(new.node, user, Operand { slot, port: new.port });
    }
    for o in &mut g.outputs {
        if o.value == old {
            o.value = new;
        }
    }
}

/// `g` with its nodes numbered in a topological order that follows `key` (smallest first
/// among the ready nodes). The partition orders kernels by the graph's topological order,
/// which takes the smallest node index first: a node added by a pass would otherwise come
/// after every ready node of a lower index (an FP8 plan's weight quantisations of every later
/// layer, all held live in the arena at once).
fn renumber(g: &Graph, key: impl Fn(NodeIndex) -> u64) -> Graph {
    let mut indeg: HashMap<NodeIndex, usize> = g.g.node_indices().map(|n| (n, 0)).collect();
    for e in g.g.edge_references() {
        *indeg.entry(e.target()).or_default() += 1;
    }
    let mut ready: BTreeSet<(u64, NodeIndex)> = indeg
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(n, _)| (key(*n), *n))
        .collect();
    let mut out = Graph::new();
    let mut map: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    while let Some((_, n)) = ready.pop_first() {
        let m = out.g.add_node(g.node(n).clone());
        map.insert(n, m);
        for e in g.g.edges_directed(n, Direction::Incoming) {
            out.g.add_edge(map[&e.source()], m, *e.weight());
        }
        for e in g.g.edges_directed(n, Direction::Outgoing) {
            let d = indeg.get_mut(&e.target()).expect("a node of the graph");
            *d -= 1;
            if *d == 0 {
                ready.insert((key(e.target()), e.target()));
            }
        }
    }
    out.inputs = g.inputs.iter().filter_map(|n| map.get(n).copied()).collect();
    out.outputs = g.outputs.clone();
    for o in &mut out.outputs {
        o.value.node = map[&o.value.node];
    }
    out
}

/// Where each node of a graph stood in its topological order, and where the nodes a pass adds
/// stand: each just before the node it replaces, so that the plan's kernel order (and the arena's
/// liveness) stays as it was ([`renumber`]).
pub(crate) struct Placement {
    pos: HashMap<NodeIndex, u64>,
    anchor: HashMap<NodeIndex, u64>,
}

impl Placement {
    pub(crate) fn of(g: &Graph) -> Placement {
        let pos = g
            .topo_order()
            .into_iter()
            .enumerate()
            .map(|(i, n)| (n, 2 * i as u64 + 1))
            .collect();
        Placement {
            pos,
            anchor: HashMap::new(),
        }
    }

    /// `new` stands just before `old`.
    pub(crate) fn before(&mut self, new: NodeIndex, old: NodeIndex) {
        self.anchor.insert(new, self.pos[&old] - 1);
    }

    /// `g` after DCE, renumbered in this order (unchanged when nothing was placed).
    pub(crate) fn finish(self, g: Graph) -> Result<Graph, PassError> {
        if self.anchor.is_empty() {
            return Ok(g);
        }
        let g = crate::cleanup::dce(g)?;
        Ok(renumber(&g, |n| {
            self.anchor
                .get(&n)
                .or_else(|| self.pos.get(&n))
                .copied()
                .unwrap_or(u64::MAX)
        }))
    }
}
