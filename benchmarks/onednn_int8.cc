// oneDNN int8 matmul timing for benchmarks/int8.py: y [M, N] = x [M, K] W^T with W int8.
//   onednn_int8 M K N COLD_MB [MODE [cpu|wall]]   (cpu: time by the process's CPU time)
// MODE wdecomp (default): fp32 activations, s8 weights with an f16 scale per 32 inputs of each output (oneDNN's
//   "weights decompression", the Q8_0 layout), fp32 output; fpmath strict, so the weights are widened to fp32.
//   Options appended to wdecomp: ":fpmath_bf16" (oneDNN may compute in bf16: less exact than our kernel),
//   ":src_bf16" (bf16 activations), ":scale_f32" (fp32 scales), ":channel" (one scale per output instead of per 32).
// MODE u8s8: activations already quantized to u8 (per-tensor scale), s8 weights (per-output scale), fp32 output: the
//   matmul of PyTorch's dynamic int8 path, without the time to quantize the activations.
// Weights are reordered once into oneDNN's preferred layout (not timed). With COLD_MB > 0 each call uses the next of
// enough weight copies to pass through COLD_MB MB. Prints "<median seconds per call> <weight bytes per call>".
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <unordered_map>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

using dnnl::memory;

int main(int argc, char **argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s M K N COLD_MB [wdecomp[:options]|u8s8]\n", argv[0]);
    return 2;
  }
  const int64_t m = std::atoll(argv[1]), k = std::atoll(argv[2]), n = std::atoll(argv[3]), cold = std::atoll(argv[4]);
  const std::string mode = argc > 5 ? argv[5] : "wdecomp";
  const bool cpu_time = argc > 6 && std::string(argv[6]) == "cpu";
  auto has = [&](const char *option) { return mode.find(option) != std::string::npos; };
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  const bool u8s8 = mode == "u8s8";
  const auto src_type = u8s8 ? memory::data_type::u8 : has(":src_bf16") ? memory::data_type::bf16 : memory::data_type::f32;
  memory::desc src_md({m, k}, src_type, memory::format_tag::ab);
  memory::desc wei_any({k, n}, memory::data_type::s8, memory::format_tag::any);
  memory::desc wei_plain({k, n}, memory::data_type::s8, memory::format_tag::ba);  // [N, K] row-major, as ours
  memory::desc dst_md({m, n}, memory::data_type::f32, memory::format_tag::ab);
  dnnl::primitive_attr attr;
  memory::desc wscale_md;
  if (u8s8) {
    attr.set_scales_mask(DNNL_ARG_SRC, 0);
    attr.set_scales_mask(DNNL_ARG_WEIGHTS, 1 << 1);
    wscale_md = memory::desc({n}, memory::data_type::f32, memory::format_tag::a);
  } else {
    attr.set_fpmath_mode(has(":fpmath_bf16") || has(":src_bf16") ? dnnl::fpmath_mode::bf16
                                                                 : dnnl::fpmath_mode::strict, true);
    const auto scale_type = has(":scale_f32") ? memory::data_type::f32 : memory::data_type::f16;
    if (has(":channel")) {
      attr.set_scales(DNNL_ARG_WEIGHTS, 1 << 1, {}, scale_type);
      wscale_md = memory::desc({n}, scale_type, memory::format_tag::a);
    } else {
      attr.set_scales(DNNL_ARG_WEIGHTS, (1 << 0) | (1 << 1), {32, 1}, scale_type);
      wscale_md = memory::desc({k / 32, n}, scale_type, memory::format_tag::ab);
    }
  }
  dnnl::matmul::primitive_desc pd;
  try {
    pd = dnnl::matmul::primitive_desc(engine, src_md, wei_any, dst_md, attr);
  } catch (const dnnl::error &e) {
    std::fprintf(stderr, "oneDNN has no %s matmul for these types here: %s\n", mode.c_str(), e.what());
    return 1;
  }
  dnnl::matmul matmul(pd);
  std::vector<int8_t> plain(static_cast<size_t>(n * k));
  for (size_t i = 0; i < plain.size(); i++) plain[i] = static_cast<int8_t>((i * 2654435761u >> 13) % 255 - 127);
  memory plain_mem(wei_plain, engine, plain.data());
  const size_t wbytes = pd.weights_desc().get_size() + wscale_md.get_size();
  const int64_t copies = cold > 0 ? std::max<int64_t>(2, (cold << 20) / static_cast<int64_t>(wbytes) + 1) : 1;
  std::vector<memory> weights, scales;
  for (int64_t c = 0; c < copies; c++) {
    weights.emplace_back(pd.weights_desc(), engine);
    dnnl::reorder(plain_mem, weights.back()).execute(stream, plain_mem, weights.back());
    scales.emplace_back(wscale_md, engine);
    std::fill_n(static_cast<uint8_t *>(scales.back().get_data_handle()), wscale_md.get_size(), 0x20);
  }
  memory src(pd.src_desc(), engine), dst(pd.dst_desc(), engine);
  std::fill_n(static_cast<uint8_t *>(src.get_data_handle()), pd.src_desc().get_size(), u8s8 ? 0x41 : 0x00);
  memory src_scale(memory::desc({1}, memory::data_type::f32, memory::format_tag::a), engine);
  *static_cast<float *>(src_scale.get_data_handle()) = 0.01f;
  stream.wait();
  std::vector<double> times;
  double spent = 0;
  for (int64_t call = 0; spent < 0.25 || times.size() < 5; call++) {
    const int64_t c = call % copies;
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights[c]}, {DNNL_ARG_DST, dst},
                                         {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, scales[c]}};
    if (u8s8) args.insert({DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, src_scale});
    const auto t = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    matmul.execute(stream, args);
    stream.wait();
    const double s = cpu_time ? static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC
                              : std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    if (call >= 2) {
      times.push_back(s);
      spent += s;
    }
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  std::printf("%s impl=%s\n%.9g %zu\n", mode.c_str(), pd.impl_info_str(), times[times.size() / 2], wbytes);
  return 0;
}
