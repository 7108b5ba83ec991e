#include "backend/frame_order.h"

#include <algorithm>
#include <array>

namespace samepage::backend {
namespace {

constexpr std::uint32_t kNone = UINT32_MAX;

struct Side {
  Addr addr;
  std::uint32_t pair;
  bool lower;  // the pair's p
};

// Both pages of every pair, by address.
std::vector<Side> SidesByAddress(std::span<const Addr> p,
                                 std::span<const Addr> q, std::uint32_t m) {
  std::vector<Side> sides;
  sides.reserve(2 * std::size_t{m});
  for (std::uint32_t i = 0; i < m; ++i) {
    sides.push_back({p[i], i, true});
    sides.push_back({q[i], i, false});
  }
  std::sort(sides.begin(), sides.end(),
            [](const Side& a, const Side& b) { return a.addr < b.addr; });
  return sides;
}

std::uint32_t PairCount(std::span<const Addr> p, std::span<const Addr> q) {
  return static_cast<std::uint32_t>(std::min(p.size(), q.size()));
}

}  // namespace

std::vector<std::uint32_t> OrderPairFrames(std::span<const Addr> p,
                                           std::span<const Addr> q) {
  const std::uint32_t m = PairCount(p, q);
  const std::vector<Side> sides = SidesByAddress(p, q, m);
  // Edge x -> y: a page of pair x lies just before a page of pair y. A
  // pair is the tail of at most two edges (out) and the head of at most
  // two (in).
  struct Edge {
    std::uint32_t from, to;
    std::uint8_t neighbours;  // page pairs it lines up: 1, or 2
    std::uint8_t lower;       // of them, pairs of two p
  };
  using Ends = std::array<std::uint32_t, 2>;
  std::vector<Edge> edges;
  std::vector<Ends> out(m, Ends{kNone, kNone});
  std::vector<Ends> in(m, Ends{kNone, kNone});
  for (std::size_t s = 0; s + 1 < sides.size(); ++s) {
    const Side& a = sides[s];
    const Side& b = sides[s + 1];
    if (b.addr != a.addr + kPageSize || a.pair == b.pair) continue;
    Ends& o = out[a.pair];
    // Both pages of x just before both of y: one edge, two neighbours.
    const std::uint8_t lower = a.lower && b.lower ? 1 : 0;
    if (o[0] != kNone && edges[o[0]].to == b.pair) {
      edges[o[0]].neighbours = 2;
      edges[o[0]].lower += lower;
      continue;
    }
    const auto e = static_cast<std::uint32_t>(edges.size());
    edges.push_back({a.pair, b.pair, 1, lower});
    o[o[0] == kNone ? 0 : 1] = e;
    Ends& i = in[b.pair];
    i[i[0] == kNone ? 0 : 1] = e;
  }
  // A maximum matching: every other edge along each path and each cycle.
  // Where either half would do (a cycle, a path of even length), the half
  // with more neighbours among the pairs' p: p next to each other then
  // take frames next to each other, as they did before, and their copy
  // is one read.
  std::vector<std::uint8_t> seen(edges.size(), 0);
  std::vector<std::uint32_t> succ(m, kNone), pred(m, kNone);
  std::vector<std::uint8_t> pred_neighbours(m, 0);
  auto other = [](const Ends& ends, std::uint32_t e) {
    return ends[0] == e ? ends[1] : ends[0];
  };
  std::vector<std::uint32_t> component;
  // The component from edge e on, entered at its tail (from_tail) or at its
  // head: from an end of a path, or anywhere on a cycle.
  auto match = [&](std::uint32_t e, bool from_tail, bool cycle) {
    component.clear();
    while (e != kNone && seen[e] == 0) {
      seen[e] = 1;
      component.push_back(e);
      const Edge& edge = edges[e];
      e = from_tail ? other(in[edge.to], e) : other(out[edge.from], e);
      from_tail = !from_tail;
    }
    std::size_t lower[2] = {0, 0};
    for (std::size_t k = 0; k < component.size(); ++k)
      lower[k % 2] += edges[component[k]].lower;
    const bool either = cycle || component.size() % 2 == 0;
    const std::size_t half = either && lower[1] > lower[0] ? 1 : 0;
    for (std::size_t k = half; k < component.size(); k += 2) {
      const Edge& edge = edges[component[k]];
      succ[edge.from] = edge.to;
      pred[edge.to] = edge.from;
      pred_neighbours[edge.to] = edge.neighbours;
    }
  };
  for (std::uint32_t x = 0; x < m; ++x) {
    if (out[x][0] != kNone && out[x][1] == kNone) match(out[x][0], true, false);
    if (in[x][0] != kNone && in[x][1] == kNone) match(in[x][0], false, false);
  }
  for (std::uint32_t e = 0; e < edges.size(); ++e) match(e, true, true);
  // Chains of frames from each pair without a predecessor; what is left
  // lies on cycles of successors, each cut where that loses one neighbour
  // (an edge of two would be cut only in a cycle of such edges).
  std::vector<std::uint32_t> order;
  order.reserve(m);
  std::vector<std::uint8_t> placed(m, 0);
  auto chain = [&](std::uint32_t x) {
    for (; x != kNone && placed[x] == 0; x = succ[x]) {
      placed[x] = 1;
      order.push_back(x);
    }
  };
  for (std::uint32_t x = 0; x < m; ++x) {
    if (pred[x] == kNone) chain(x);
  }
  for (std::uint32_t x = 0; x < m; ++x) {
    if (placed[x] != 0) continue;
    std::uint32_t start = x;
    while (pred_neighbours[start] != 1 && succ[start] != x) start = succ[start];
    if (pred_neighbours[start] != 1) start = x;
    chain(start);
  }
  return order;
}

std::vector<std::uint32_t> CostByPrefix(std::span<const Addr> p,
                                        std::span<const Addr> q,
                                        std::span<const std::uint32_t> order,
                                        std::span<const std::uint8_t> p_cost,
                                        std::span<const std::uint8_t> q_cost) {
  const std::uint32_t m = PairCount(p, q);
  std::vector<std::uint32_t> pos(m, kNone);
  for (std::size_t k = 0; k < order.size() && k < m; ++k) {
    pos[order[k]] = static_cast<std::uint32_t>(k);
  }
  // A page continues its left neighbour's mapping when that page's pair
  // takes the frame just before its own: it joins a prefix together with
  // it, as the neighbour's pair comes one place earlier. Any other page
  // starts a mapping of its own.
  const std::vector<Side> sides = SidesByAddress(p, q, m);
  std::vector<std::uint32_t> cost(m, 0);
  for (std::size_t s = 0; s < sides.size(); ++s) {
    const Side& page = sides[s];
    if (s > 0) {
      const Side& left = sides[s - 1];
      if (page.addr == left.addr + kPageSize && pos[left.pair] != kNone &&
          pos[page.pair] != kNone && pos[left.pair] + 1 == pos[page.pair]) {
        continue;
      }
    }
    cost[page.pair] += page.lower ? p_cost[page.pair] : q_cost[page.pair];
  }
  std::vector<std::uint32_t> prefix(order.size());
  std::uint32_t total = 0;
  for (std::size_t k = 0; k < order.size(); ++k) {
    total += cost[order[k]];
    prefix[k] = total;
  }
  return prefix;
}

}  // namespace samepage::backend
