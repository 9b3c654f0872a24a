// bf16 matmuls for CPU decoding on AMX or AVX512-BF16, on oneDNN's brgemm micro-kernel (torch's at::native::cpublas),
// weights packed once at load: a linear layer, and one call per MoE layer for every expert's gate_up, SiLU-and-mul and
// down.
//
// Why: at decode aten::mm in bf16 pays a fixed ~45-100 us a call on these CPUs (more than fp32's), whatever the rows;
// a batch of 32 tokens sends most experts 1-8 rows, three calls an expert plus the Python between them. brgemm on
// prepacked weights has no per-call set-up to speak of, and every function here releases the GIL.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t BLOCK_M = 32;
constexpr int64_t BLOCK_N = 32;
using bf16 = at::BFloat16;

// A block of one expert's rows: `size` consecutive entries of the expert-sorted order, from `start`.
struct RowBlock {
  int64_t expert, start, size;
};

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

// (..., out, in) -> (..., out / BLOCK_N, in / 2, BLOCK_N, 2): brgemm's B operand (in x out) in VNNI pairs.
torch::Tensor pack_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() >= 2 && weight.scalar_type() == torch::kBFloat16, "expected a bf16 weight (..., out, in)");
  const int64_t out = weight.size(-2), in = weight.size(-1);
  TORCH_CHECK(out % BLOCK_N == 0 && in % 2 == 0, "weight sizes must be multiples of 32 (out) and 2 (in)");
  auto w = weight.reshape({-1, out / BLOCK_N, BLOCK_N, in / 2, 2}).permute({0, 1, 3, 2, 4}).contiguous();
  auto shape = weight.sizes().vec();
  shape.back() = in / 2, shape[shape.size() - 2] = out / BLOCK_N;
  shape.push_back(BLOCK_N);
  shape.push_back(2);
  return w.view(shape);
}

// x (rows, in) bf16 @ W.T, W packed from (out, in): (rows, out) bf16, in blocks of 32 rows x 32 columns. With `low`
// (rows, rank) bf16, each row's low-rank activations, and `lora_b` packed from B (out, rank), it adds low @ B.T to
// the fp32 tile before rounding: LoRA stacked beside the base layer at no extra pass over the output.
torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& packed, const bf16* low, const bf16* lora_b,
                          int64_t rank) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x: contiguous 2-D bf16");
  const int64_t rows = x.size(0), in = x.size(1), column_blocks = packed.size(0);
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 2 == in, "the packed weight does not match x");
  const int64_t out = column_blocks * BLOCK_N, row_blocks = (rows + BLOCK_M - 1) / BLOCK_M;
  auto y = at::empty({rows, out}, x.options());
  const bf16* a = x.data_ptr<bf16>();
  const bf16* w = packed.data_ptr<bf16>();
  bf16* c = y.data_ptr<bf16>();
  at::parallel_for(0, row_blocks * column_blocks, 0, [&](int64_t begin, int64_t end) {
    alignas(64) float tile[BLOCK_M * BLOCK_N];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t mb = item / column_blocks, nb = item % column_blocks;
      const int64_t m0 = mb * BLOCK_M, m = std::min(BLOCK_M, rows - m0);
      at::native::cpublas::brgemm(m, BLOCK_N, in, in, BLOCK_N, BLOCK_N, false, a + m0 * in, w + nb * in * BLOCK_N,
                                  tile);
      if (low != nullptr)
        at::native::cpublas::brgemm(m, BLOCK_N, rank, rank, BLOCK_N, BLOCK_N, true, low + m0 * rank,
                                    lora_b + nb * rank * BLOCK_N, tile);
      for (int64_t r = 0; r < m; ++r) {
        const float* t = tile + r * BLOCK_N;
        bf16* dst = c + (m0 + r) * out + nb * BLOCK_N;
#pragma omp simd
        for (int64_t n = 0; n < BLOCK_N; ++n) dst[n] = bf16(t[n]);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return y;
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed) {
  return linear_impl(x, packed, nullptr, nullptr, 0);
}

// x @ W.T + ((x @ A.T) * mask) @ B.T, both low-rank matmuls on brgemm too: A (rank, in) and B (out, rank) stack
// every adapter's factors, packed with the rank padded to a column block; mask (sequences, rank) fp32 keeps each
// sequence's adapter's columns, for the rows / sequences consecutive rows of x that are its tokens.
torch::Tensor lora_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& lora_a,
                          const torch::Tensor& lora_b, const torch::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x: contiguous 2-D bf16");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == torch::kFloat && mask.is_contiguous(), "mask: contiguous fp32");
  const int64_t rows = x.size(0), in = x.size(1), rank = mask.size(1), sequences = mask.size(0);
  const int64_t rank_blocks = lora_a.size(0), padded = rank_blocks * BLOCK_N;
  TORCH_CHECK(lora_a.dim() == 4 && lora_a.size(1) * 2 == in && padded >= rank && lora_b.dim() == 4 &&
                  lora_b.size(0) == packed.size(0) && lora_b.size(1) * 2 == padded,
              "the packed LoRA factors or the mask do not match x and the packed weight");
  TORCH_CHECK(sequences > 0 && rows % sequences == 0, "the mask needs one row per sequence of x");
  const int64_t tokens = rows / sequences, row_blocks = (rows + BLOCK_M - 1) / BLOCK_M;
  auto low = at::empty({rows, padded}, x.options());
  const bf16* input = x.data_ptr<bf16>();
  const bf16* factors = lora_a.data_ptr<bf16>();
  const float* keep = mask.data_ptr<float>();
  bf16* h = low.data_ptr<bf16>();
  // A decode step's one block runs inline: a parallel region would cost more than it.
  at::parallel_for(0, row_blocks * rank_blocks, 2, [&](int64_t begin, int64_t end) {
    alignas(64) float tile[BLOCK_M * BLOCK_N];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t mb = item / rank_blocks, rb = item % rank_blocks;
      const int64_t m0 = mb * BLOCK_M, m = std::min(BLOCK_M, rows - m0);
      at::native::cpublas::brgemm(m, BLOCK_N, in, in, BLOCK_N, BLOCK_N, false, input + m0 * in,
                                  factors + rb * in * BLOCK_N, tile);
      for (int64_t r = 0; r < m; ++r) {
        const float* kept = keep + ((m0 + r) / tokens) * rank;
        for (int64_t n = 0, j = rb * BLOCK_N; n < BLOCK_N; ++n, ++j)
          h[(m0 + r) * padded + j] = bf16(j < rank ? tile[r * BLOCK_N + n] * kept[j] : 0.0f);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return linear_impl(x, packed, h, lora_b.data_ptr<bf16>(), padded);
}

// x (tokens, hidden) bf16; top_k_index (tokens, k) int64; top_k_weights (tokens, k) float32;
// gate_up packed from (experts, 2 * inter, hidden); down packed from (experts, hidden, inter).
torch::Tensor fused_experts(const torch::Tensor& x, const torch::Tensor& top_k_index, const torch::Tensor& top_k_weights,
                            const torch::Tensor& gate_up, const torch::Tensor& down) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x: contiguous 2-D bf16");
  TORCH_CHECK(top_k_index.scalar_type() == torch::kLong && top_k_weights.scalar_type() == torch::kFloat,
              "top_k_index int64, top_k_weights float32");
  const int64_t tokens = x.size(0), hidden = x.size(1), k = top_k_index.size(1);
  const int64_t experts = gate_up.size(0), inter_blocks = gate_up.size(1) / 2, inter = inter_blocks * BLOCK_N;
  const int64_t hidden_blocks = down.size(1);
  TORCH_CHECK(gate_up.size(2) * 2 == hidden && hidden_blocks * BLOCK_N == hidden && down.size(2) * 2 == inter,
              "packed weights do not match x");
  auto index = top_k_index.contiguous();
  auto weights = top_k_weights.contiguous();
  const int64_t* ids = index.data_ptr<int64_t>();
  const float* route = weights.data_ptr<float>();

  // Sort the (token, slot) rows by expert: rows[p] = token * k + slot.
  const int64_t total = tokens * k;
  std::vector<int64_t> offset(experts + 1, 0);
  for (int64_t r = 0; r < total; ++r) {
    TORCH_CHECK(ids[r] >= 0 && ids[r] < experts, "expert index out of range");
    ++offset[ids[r] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) offset[e + 1] += offset[e];
  std::vector<int64_t> rows(total), fill(offset.begin(), offset.end() - 1);
  for (int64_t r = 0; r < total; ++r) rows[fill[ids[r]]++] = r;
  std::vector<RowBlock> blocks;
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t m = offset[e]; m < offset[e + 1]; m += BLOCK_M)
      blocks.push_back({e, m, std::min(BLOCK_M, offset[e + 1] - m)});
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());

  auto hidden_act = at::empty({total, inter}, x.options());                 // in expert-sorted order
  auto partial = at::empty({total, hidden}, x.options().dtype(at::kFloat));  // by row: token * k + slot
  const bf16* input = x.data_ptr<bf16>();
  const bf16* w13 = gate_up.data_ptr<bf16>();
  const bf16* w2 = down.data_ptr<bf16>();
  bf16* act = hidden_act.data_ptr<bf16>();
  float* part = partial.data_ptr<float>();
  const int64_t w13_block = hidden * BLOCK_N, w2_block = inter * BLOCK_N;

  // 1. act = silu(x @ gate.T) * (x @ up.T), one (row block, column block) at a time.
  at::parallel_for(0, num_blocks * inter_blocks, 0, [&](int64_t begin, int64_t end) {
    std::vector<bf16> a(BLOCK_M * hidden);
    alignas(64) float gate[BLOCK_M * BLOCK_N];
    alignas(64) float up[BLOCK_M * BLOCK_N];
    int64_t gathered = -1;
    for (int64_t item = begin; item < end; ++item) {
      const RowBlock& block = blocks[item / inter_blocks];
      const int64_t nb = item % inter_blocks;
      if (gathered != item / inter_blocks) {
        for (int64_t m = 0; m < block.size; ++m)
          std::copy_n(input + (rows[block.start + m] / k) * hidden, hidden, a.data() + m * hidden);
        gathered = item / inter_blocks;
      }
      const bf16* expert = w13 + block.expert * 2 * inter_blocks * w13_block;
      at::native::cpublas::brgemm(block.size, BLOCK_N, hidden, hidden, BLOCK_N, BLOCK_N, false, a.data(),
                                  expert + nb * w13_block, gate);
      at::native::cpublas::brgemm(block.size, BLOCK_N, hidden, hidden, BLOCK_N, BLOCK_N, false, a.data(),
                                  expert + (inter_blocks + nb) * w13_block, up);
      for (int64_t m = 0; m < block.size; ++m) {
        bf16* out = act + (block.start + m) * inter + nb * BLOCK_N;
        const float* g = gate + m * BLOCK_N;
        const float* u = up + m * BLOCK_N;
#pragma omp simd
        for (int64_t n = 0; n < BLOCK_N; ++n) out[n] = bf16(silu(g[n]) * u[n]);
      }
    }
    at::native::cpublas::brgemm_release();
  });

  // 2. partial[row] = route weight * (act @ down.T): an expert's rows of `act` are already contiguous.
  at::parallel_for(0, num_blocks * hidden_blocks, 0, [&](int64_t begin, int64_t end) {
    alignas(64) float c[BLOCK_M * BLOCK_N];
    for (int64_t item = begin; item < end; ++item) {
      const RowBlock& block = blocks[item / hidden_blocks];
      const int64_t nb = item % hidden_blocks;
      at::native::cpublas::brgemm(block.size, BLOCK_N, inter, inter, BLOCK_N, BLOCK_N, false,
                                  act + block.start * inter,
                                  w2 + (block.expert * hidden_blocks + nb) * w2_block, c);
      for (int64_t m = 0; m < block.size; ++m) {
        const int64_t row = rows[block.start + m];
        const float scale = route[row];
        float* out = part + row * hidden + nb * BLOCK_N;
#pragma omp simd
        for (int64_t n = 0; n < BLOCK_N; ++n) out[n] = c[m * BLOCK_N + n] * scale;
      }
    }
    at::native::cpublas::brgemm_release();
  });

  // 3. Sum each token's k slots in fp32, as transformers' grouped path does.
  return partial.view({tokens, k, hidden}).sum(1).to(torch::kBFloat16);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "weight (..., out, in) -> brgemm's packed layout");
  m.def("linear", &linear, "x @ W.T on a packed W", py::call_guard<py::gil_scoped_release>());
  m.def("lora_linear", &lora_linear, "x @ W.T on a packed W plus packed LoRA factors, each sequence its own adapter",
        py::call_guard<py::gil_scoped_release>());
  m.def("fused_experts", &fused_experts, "every expert of one MoE layer in one call",
        py::call_guard<py::gil_scoped_release>());
}
