// Frame order for scattered pairs: which new frame each pair gets.
//
// A scattered pair's two pages share one new frame, and each page maps it
// with a mapping of its own unless the page before it in memory maps the
// frame just before (then one mmap, and one VMA, covers both). Frames taken
// in the order of the pairs' lower pages line up only where those lie next
// to each other; OrderPairFrames numbers the pairs so that as many
// neighbours in memory as possible get neighbouring frames, whichever side
// of their pairs they are.
//
// Each pair has at most two pages with a page right after them, and at
// most two right before: the wished "x's frame, then y's" relations form a
// bipartite graph of degree at most 2 (x as a predecessor, y as a
// successor), whose components are paths and even cycles. Every other edge
// of each is a maximum matching; the matched relations, cut once in each
// cycle they close, are chains of frames. On random pairs of 40,000 pages
// that is about one mapping per pair, against 1.34 with frames in the
// lower pages' order (docs/performance.md).
//
// Pure computation, no system calls; thread-compatible.

#ifndef SAMEPAGE_BACKEND_FRAME_ORDER_H_
#define SAMEPAGE_BACKEND_FRAME_ORDER_H_

#include <cstdint>
#include <span>
#include <vector>

#include "core/memory.h"

namespace samepage::backend {

// A permutation of [0, p.size()): pair order[k] takes the k-th frame of a
// consecutive block. Chains come in the order of their first pair's index
// (those cut from cycles last), so pairs given in address order keep
// frames roughly in address order.
// REQUIRES: p.size() == q.size() < 2^31; the pages are page-aligned and
// distinct (no page in two pairs, p[i] != q[i]).
std::vector<std::uint32_t> OrderPairFrames(std::span<const Addr> p,
                                           std::span<const Addr> q);

// With pair order[k] in frame k: element k is what the mappings the pages
// of pairs order[0..k] take together (maximal runs of pages next to each
// other in memory whose frames follow each other) cost, each weighed by
// the page it starts at: p_cost[i] for a mapping that starts at p[i],
// q_cost[i] at q[i] (the VMAs it may add, say); pages continuing a mapping
// add nothing. So a caller short of VMAs can take the longest prefix it
// has room for; with all weights 1 it counts the mappings.
// REQUIRES: as OrderPairFrames; order a permutation of [0, p.size());
// p_cost.size() and q_cost.size() at least p.size().
std::vector<std::uint32_t> CostByPrefix(std::span<const Addr> p,
                                        std::span<const Addr> q,
                                        std::span<const std::uint32_t> order,
                                        std::span<const std::uint8_t> p_cost,
                                        std::span<const std::uint8_t> q_cost);

}  // namespace samepage::backend

#endif  // SAMEPAGE_BACKEND_FRAME_ORDER_H_
