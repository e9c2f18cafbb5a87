// Planning a Newton–Schulz call (see ns_plan.cuh): the tile choice, the padded sizes, the chunks
// of the averaging pass and the workspace size and layout.
#include "ns_plan.cuh"

namespace scion::ns {
namespace {

// Elements per chunk of the element-wise passes (whole rows; at least one row).
constexpr int64_t kChunkElements = int64_t{1} << 16;

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

}  // namespace

int choose_tile(int64_t m, int64_t n, int requested, bool gram, bool wgmma) {
  if (requested == 1 || requested == 64 || requested == 128) return requested;
  if (!gram && m <= kSmallM && n <= kSmallMaxN) return 1;
  return (wgmma || (m >= 512 && n >= 512)) ? 128 : 64;
}

Plan make_plan(int64_t batch, int64_t rows, int64_t cols, int tile_request, int gram_restart,
               int wgmma) {
  Plan p{};
  p.m = rows < cols ? rows : cols;
  p.n = rows < cols ? cols : rows;
  p.gram_restart = gram_restart;
  p.tile = choose_tile(p.m, p.n, tile_request, gram_restart > 0, wgmma != 0);
  p.wgmma = p.tile == 128 ? wgmma : 0;
  if (p.tile == 1) {  // the one-block path needs no workspace
    p.m_pad = kSmallM;
    p.n_pad = round_up(p.n, 64);
    return p;
  }
  p.m_pad = round_up(p.m, p.tile);
  p.n_pad = round_up(p.n, p.tile);
  p.chunk_rows = static_cast<int>(cols >= kChunkElements ? 1 : kChunkElements / cols);
  if (p.chunk_rows > rows) p.chunk_rows = static_cast<int>(rows);
  p.chunks = static_cast<int>((rows + p.chunk_rows - 1) / p.chunk_rows);
  p.x_elems = p.m_pad * p.n_pad;
  p.a_elems = p.m_pad * p.m_pad;
  // X, Y and two (the Gram form: four) m_pad² matrices in the operand type (2 bytes), then the
  // fp64 chunk sums, 256-byte aligned.
  const int64_t squares = gram_restart > 0 ? 4 : 2;
  p.sums_offset = round_up(batch * (2 * p.x_elems + squares * p.a_elems) * 2, 256);
  p.bytes = static_cast<size_t>(p.sums_offset + round_up(batch * p.chunks * 8, 256));
  return p;
}

}  // namespace scion::ns
