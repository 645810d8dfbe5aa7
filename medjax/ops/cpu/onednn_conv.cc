// oneDNN convolutions as XLA FFI handlers for the CPU backend: forward, input gradient and kernel
// gradient of a channels-last N-D convolution (1-, 2- or 3-D), float32.
//
// medjax/ops/cpu/onednn.py compiles this file against the installed jaxlib's FFI headers and the
// oneDNN wheel, registers the three handlers and wraps them in a custom-VJP convolution.
//
// Layouts: activations [N, *spatial, C] (oneDNN nwc / nhwc / ndhwc), kernels [*k, C_in, C_out]
// (wio / hwio / dhwio). Attributes: strides, pad_lo, pad_hi (one per spatial dim, lax's padding)
// and threads (OpenMP threads for this call: XLA may run one call per host device at once).
//
// Primitives are built once per shape and thread count and cached; each call brings its own
// scratchpad, so calls from several XLA devices' threads may run the same primitive at once.

#include <omp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

using Dims = ffi::Span<const int64_t>;
constexpr auto kF32 = memory::data_type::f32;

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

memory::format_tag ActivationTag(size_t rank) {
  return rank == 3 ? memory::format_tag::nwc
         : rank == 4 ? memory::format_tag::nhwc
                     : memory::format_tag::ndhwc;
}

memory::format_tag KernelTag(size_t rank) {
  return rank == 3 ? memory::format_tag::wio
         : rank == 4 ? memory::format_tag::hwio
                     : memory::format_tag::dhwio;
}

// [N, *S, C] -> oneDNN's logical {N, C, *S}.
memory::dims ActivationDims(Dims d) {
  memory::dims r{d[0], d[d.size() - 1]};
  for (size_t i = 1; i + 1 < d.size(); ++i) r.push_back(d[i]);
  return r;
}

// [*K, C_in, C_out] -> {C_out, C_in, *K}.
memory::dims KernelDims(Dims d) {
  size_t n = d.size();
  memory::dims r{d[n - 1], d[n - 2]};
  for (size_t i = 0; i + 2 < n; ++i) r.push_back(d[i]);
  return r;
}

memory::dims ToDims(Dims s) { return memory::dims(s.begin(), s.end()); }

// The shapes of one convolution, in oneDNN's terms, and the forward descriptor that the gradient
// primitives take as their hint.
struct Problem {
  size_t rank;
  memory::desc src, dst, kernel_user, kernel_any;
  memory::dims strides, pad_lo, pad_hi;
  std::string key;

  Problem(Dims x, Dims kernel, Dims y, Dims s, Dims lo, Dims hi, int64_t threads)
      : rank(x.size()),
        src(ActivationDims(x), kF32, ActivationTag(rank)),
        dst(ActivationDims(y), kF32, ActivationTag(rank)),
        kernel_user(KernelDims(kernel), kF32, KernelTag(rank)),
        kernel_any(KernelDims(kernel), kF32, memory::format_tag::any),
        strides(ToDims(s)),
        pad_lo(ToDims(lo)),
        pad_hi(ToDims(hi)) {
    for (auto dims : {x, kernel, y, s, lo, hi}) {
      for (int64_t v : dims) key += std::to_string(v) + ",";
      key += "|";
    }
    key += std::to_string(threads);
  }

  dnnl::primitive_attr Attr() const {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return attr;
  }

  dnnl::convolution_forward::primitive_desc Forward() const {
    return dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
        kernel_any, dst, strides, pad_lo, pad_hi, Attr());
  }

  // A gradient's primitive descriptor (backward data or backward weights), hinted by Forward().
  template <typename PrimitiveDesc>
  PrimitiveDesc Backward() const {
    return PrimitiveDesc(Engine(), dnnl::algorithm::convolution_direct, src, kernel_any, dst,
                         strides, pad_lo, pad_hi, Forward(), Attr());
  }
};

struct Cached {
  dnnl::primitive primitive;
  memory::desc kernel;  // the primitive's own kernel layout
  memory::desc scratchpad;
};

// One cache per primitive kind; built under the lock, executed outside it.
const Cached& Lookup(char kind, const Problem& p, const std::function<Cached()>& make) {
  static std::mutex mu;
  static auto* cache = new std::unordered_map<std::string, std::unique_ptr<Cached>>();
  std::lock_guard<std::mutex> lock(mu);
  std::string key = kind + p.key;
  auto it = cache->find(key);
  if (it == cache->end()) it = cache->emplace(key, std::make_unique<Cached>(make())).first;
  return *it->second;
}

void Run(const Cached& c, std::unordered_map<int, memory> args) {
  dnnl::stream stream(Engine());
  std::unique_ptr<char[]> scratch(new char[c.scratchpad.get_size() + 1]);
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(c.scratchpad, Engine(), scratch.get()));
  c.primitive.execute(stream, args);
  stream.wait();
}

// `user` in the primitive's kernel layout (a reorder into a temporary when they differ).
memory KernelIn(const Cached& c, const memory::desc& user_md, void* data) {
  memory user(user_md, Engine(), data);
  if (c.kernel == user_md) return user;
  memory blocked(c.kernel, Engine());
  dnnl::stream stream(Engine());
  dnnl::reorder(user, blocked).execute(stream, user, blocked);
  stream.wait();
  return blocked;
}

template <typename F>
ffi::Error Guard(int64_t threads, F&& body) {
  try {
    omp_set_num_threads(static_cast<int>(threads));
    body();
    return ffi::Error::Success();
  } catch (const std::exception& e) {  // dnnl::error among them
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> y, Dims strides, Dims pad_lo, Dims pad_hi,
                       int64_t threads) {
  return Guard(threads, [&] {
    Problem p(x.dimensions(), kernel.dimensions(), y->dimensions(), strides, pad_lo, pad_hi,
              threads);
    const Cached& c = Lookup('f', p, [&] {
      auto pd = p.Forward();
      return Cached{dnnl::convolution_forward(pd), pd.weights_desc(), pd.scratchpad_desc()};
    });
    Run(c, {{DNNL_ARG_SRC, memory(p.src, Engine(), x.typed_data())},
            {DNNL_ARG_WEIGHTS, KernelIn(c, p.kernel_user, kernel.typed_data())},
            {DNNL_ARG_DST, memory(p.dst, Engine(), y->typed_data())}});
  });
}

ffi::Error BackwardDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                            ffi::ResultBuffer<ffi::F32> dx, Dims strides, Dims pad_lo,
                            Dims pad_hi, int64_t threads) {
  return Guard(threads, [&] {
    Problem p(dx->dimensions(), kernel.dimensions(), dy.dimensions(), strides, pad_lo, pad_hi,
              threads);
    const Cached& c = Lookup('d', p, [&] {
      auto pd = p.Backward<dnnl::convolution_backward_data::primitive_desc>();
      return Cached{dnnl::convolution_backward_data(pd), pd.weights_desc(), pd.scratchpad_desc()};
    });
    Run(c, {{DNNL_ARG_DIFF_DST, memory(p.dst, Engine(), dy.typed_data())},
            {DNNL_ARG_WEIGHTS, KernelIn(c, p.kernel_user, kernel.typed_data())},
            {DNNL_ARG_DIFF_SRC, memory(p.src, Engine(), dx->typed_data())}});
  });
}

ffi::Error BackwardKernelImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dkernel, Dims strides, Dims pad_lo,
                              Dims pad_hi, int64_t threads) {
  return Guard(threads, [&] {
    Problem p(x.dimensions(), dkernel->dimensions(), dy.dimensions(), strides, pad_lo, pad_hi,
              threads);
    const Cached& c = Lookup('w', p, [&] {
      auto pd = p.Backward<dnnl::convolution_backward_weights::primitive_desc>();
      return Cached{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(),
                    pd.scratchpad_desc()};
    });
    memory user(p.kernel_user, Engine(), dkernel->typed_data());
    memory out = c.kernel == p.kernel_user ? user : memory(c.kernel, Engine());
    Run(c, {{DNNL_ARG_SRC, memory(p.src, Engine(), x.typed_data())},
            {DNNL_ARG_DIFF_DST, memory(p.dst, Engine(), dy.typed_data())},
            {DNNL_ARG_DIFF_WEIGHTS, out}});
    if (out != user) {
      dnnl::stream stream(Engine());
      dnnl::reorder(out, user).execute(stream, out, user);
      stream.wait();
    }
  });
}

}  // namespace

#define MEDJAX_CONV_BINDING                                                   \
  ffi::Ffi::Bind()                                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                                           \
      .Arg<ffi::Buffer<ffi::F32>>()                                           \
      .Ret<ffi::Buffer<ffi::F32>>()                                           \
      .Attr<Dims>("strides")                                                  \
      .Attr<Dims>("pad_lo")                                                   \
      .Attr<Dims>("pad_hi")                                                   \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxConvForward, ForwardImpl, MEDJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxConvBackwardData, BackwardDataImpl, MEDJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxConvBackwardKernel, BackwardKernelImpl, MEDJAX_CONV_BINDING);
