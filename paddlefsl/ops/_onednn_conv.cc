// oneDNN 2-D convolution kernels for Paddle (CPU, float32, NCHW, groups 1, dilation 1).
//
// Raw custom ops, without grad ops (autograd is composed in Python):
//
//   onednn_conv2d_forward(x, w)          -> y    attrs: strides, paddings, keep, threads
//   onednn_conv2d_backward_data(dy, w)   -> dx   attrs: strides, paddings, input_hw, threads
//   onednn_conv2d_backward_weight(x, dy) -> dw   attrs: strides, paddings, kernel_hw, threads
//   onednn_conv2d_forward_bias(x, w, b)  -> y = conv(x, w) + b (b per output channel);
//                                           attrs as the forward
//   onednn_conv2d_backward_weight_bias(x, dy) -> dw, db = dy summed per channel
//
// The bias variants fold a Conv2D layer's bias into the convolution: oneDNN adds it as the
// output is written and sums its gradient while it reads dy, which saves a full pass over
// the output each way.
//
// keep (forward ops): 1 when the filter gradient of this convolution will be asked for
// (the caller records it in a graph). The blocked copy of x made for the forward is then
// kept, and the filter-gradient op that gets the same x uses it instead of reordering x
// again (see KeptInputs).
//
// Filter gradients and forwards of convolutions with few input channels (C*KH*KW <= 27:
// an image network's first layer) are products of matrices on oneDNN's sgemm instead of
// its convolution kernels (see gemm_filter_gradient_applies and gemm_forward).
//
// strides = {sh, sw}; paddings = {ph, pw}, applied on both sides, or {top, bottom, left,
// right} (TensorFlow's SAME padding of a strided convolution pads one pixel more after
// than before); threads >= 1 is the OpenMP team size for this call only (the caller's
// setting is restored afterwards, so Paddle's own kernels keep their thread count).
//
// Built by paddlefsl/ops/_onednn_build.py against oneDNN 3.6 headers and linked with the
// libdnnl.so.3 and libiomp5.so that ship in the Paddle wheel. Only the stable v3 C++ API
// is used (dnnl.hpp), as far as oneDNN 3.6.1 and 3.6.2 share it.
//
// Why blocked layouts: oneDNN's fast CPU convolutions (jit:avx2 / jit:avx512) want
// activations in nChw8c/nChw16c and weights in a matching blocked layout. The primitive
// descriptors are created with format_tag::any and every argument is reordered from and
// to Paddle's plain NCHW / OIHW tensors; the reorders cost far less than the speed-up.
//
// Cache: creating a primitive descriptor means searching oneDNN's implementation list
// (tens of microseconds to milliseconds), so the convolution primitive and its reorder
// primitives are cached per (op, shapes, strides, paddings, threads) in a small LRU
// map. The thread count is part of the key because a oneDNN CPU primitive is tuned for
// (and must run with at most) the OpenMP team size it was created with. Scratch
// buffers for the blocked copies are allocated per call through Paddle's allocator
// (which recycles them), so cached entries hold no large memory and concurrent calls
// from several Python threads share nothing mutable.

#include <algorithm>
#include <array>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "paddle/extension.h"

// OpenMP runtime entry points (Paddle's libiomp5). Declared here rather than through
// <omp.h> so that the build needs no -fopenmp: we must use the runtime oneDNN uses.
extern "C" {
int omp_get_max_threads(void);
void omp_set_num_threads(int);
int omp_get_thread_num(void);
}

namespace {

using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using Dt = dnnl::memory::data_type;

// At most this many (op, shape, threads) entries stay cached; the least recently used
// one is dropped first. A meta-learning model has a handful of conv layers times a few
// batch shapes (support, query, evaluation) times three ops.
constexpr size_t kCacheCapacity = 128;

enum Kind : int64_t {
  kForward = 0,
  kBackwardData = 1,
  kBackwardWeight = 2,
  kForwardBias = 3,
  kBackwardWeightBias = 4
};

bool with_bias(Kind kind) { return kind == kForwardBias || kind == kBackwardWeightBias; }

const char* kind_name(Kind kind) {
  switch (kind) {
    case kForward:
      return "onednn_conv2d_forward";
    case kBackwardData:
      return "onednn_conv2d_backward_data";
    case kForwardBias:
      return "onednn_conv2d_forward_bias";
    case kBackwardWeightBias:
      return "onednn_conv2d_backward_weight_bias";
    default:
      return "onednn_conv2d_backward_weight";
  }
}

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A stream is not meant to be shared between threads; a CPU stream is cheap.
dnnl::stream& thread_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

// Sets the calling thread's OpenMP team size for the lifetime of the guard.
class ThreadGuard {
 public:
  explicit ThreadGuard(int threads) : previous_(omp_get_max_threads()) {
    if (threads != previous_) omp_set_num_threads(threads);
  }
  ~ThreadGuard() {
    if (omp_get_max_threads() != previous_) omp_set_num_threads(previous_);
  }
  ThreadGuard(const ThreadGuard&) = delete;
  ThreadGuard& operator=(const ThreadGuard&) = delete;

 private:
  int previous_;
};

// Geometry of one convolution: x [n, c, h, w], w [o, c, kh, kw], y [n, o, oh, ow].
struct Geometry {
  int64_t n, c, h, w, o, kh, kw, oh, ow, sh, sw;
  int64_t pt, pb, pl, pr;  // padding above, below, left and right of the input
};

// Filter gradients with few input channels (an image network's first layer) run as
// products of matrices: oneDNN's direct kernels take these at 2-7 GFLOP/s on AVX2 (the
// 1-channel Omniglot layer, the 3-channel miniImageNet one), their reduction over all
// output pixels being too narrow to vectorise. Here dw [O, C*KH*KW] = sum over images of
// dy_n [O, P] x col_n^T, where col_n [C*KH*KW, P] is image n unfolded (im2col) and P the
// output pixels, with oneDNN's sgemm; images are split between the threads, each summing
// into its own buffer.
constexpr int64_t kGemmFilterGradientMaxK = 27;  // C*KH*KW: up to 3 channels of 3x3

bool gemm_filter_gradient_applies(const Geometry& g) {
  return g.c * g.kh * g.kw <= kGemmFilterGradientMaxK;
}

int64_t out_size(int64_t in, int64_t k, int64_t s, int64_t before, int64_t after) {
  return (in + before + after - k) / s + 1;
}

void check_pair(const char* op, const char* name, const std::vector<int>& v,
                int minimum) {
  PD_CHECK(v.size() == 2, op, ": ", name, " must have 2 values, got ", v.size());
  PD_CHECK(v[0] >= minimum && v[1] >= minimum, op, ": ", name, " must be >= ",
           minimum, ", got [", v[0], ", ", v[1], "]");
}

void check_tensor(const char* op, const char* name, const paddle::Tensor& t,
                  size_t rank = 4) {
  PD_CHECK(t.numel() == 0 || t.initialized(), op, ": ", name, " is not initialized");
  PD_CHECK(t.is_dense_tensor() && t.is_cpu(), op, ": ", name,
           " must be a dense CPU tensor");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, op, ": ", name,
           " must be float32, got ", t.dtype(),
           " (oneDNN has no float64 CPU convolution; use paddle.nn.functional.conv2d)");
  PD_CHECK(t.shape().size() == rank, op, ": ", name, " must be ", rank, "-D, got ",
           t.shape().size(), "-D");
}

// Validates the geometry, which is complete once x, w and strides/paddings are known.
Geometry make_geometry(const char* op, const std::vector<int64_t>& xs,
                       const std::vector<int64_t>& ws, const std::vector<int>& strides,
                       const std::vector<int>& paddings) {
  check_pair(op, "strides", strides, 1);
  PD_CHECK(paddings.size() == 2 || paddings.size() == 4, op,
           ": paddings must have 2 values (both sides) or 4 (top, bottom, left, right), got ",
           paddings.size());
  for (int p : paddings) PD_CHECK(p >= 0, op, ": paddings must be >= 0, got ", p);
  Geometry g{};
  g.n = xs[0];
  g.c = xs[1];
  g.h = xs[2];
  g.w = xs[3];
  g.o = ws[0];
  g.kh = ws[2];
  g.kw = ws[3];
  g.sh = strides[0];
  g.sw = strides[1];
  if (paddings.size() == 2) {
    g.pt = g.pb = paddings[0];
    g.pl = g.pr = paddings[1];
  } else {
    g.pt = paddings[0];
    g.pb = paddings[1];
    g.pl = paddings[2];
    g.pr = paddings[3];
  }
  PD_CHECK(ws[1] == g.c, op, ": input has ", g.c, " channels but the weight expects ",
           ws[1], " (only groups=1, NCHW input and OIHW weights are supported)");
  PD_CHECK(g.n >= 0 && g.c > 0 && g.h > 0 && g.w > 0 && g.o > 0 && g.kh > 0 && g.kw > 0,
           op, ": empty channel, spatial or kernel dimension");
  PD_CHECK(g.h + g.pt + g.pb >= g.kh && g.w + g.pl + g.pr >= g.kw, op, ": kernel ", g.kh,
           "x", g.kw, " is larger than the padded input ", g.h + g.pt + g.pb, "x",
           g.w + g.pl + g.pr);
  g.oh = out_size(g.h, g.kh, g.sh, g.pt, g.pb);
  g.ow = out_size(g.w, g.kw, g.sw, g.pl, g.pr);
  return g;
}

void check_dy(const char* op, const Geometry& g, const std::vector<int64_t>& ds,
              const char* hw_name) {
  PD_CHECK(ds[0] == g.n && ds[1] == g.o && ds[2] == g.oh && ds[3] == g.ow, op,
           ": dy has shape [", ds[0], ", ", ds[1], ", ", ds[2], ", ", ds[3],
           "] but the convolution gives [", g.n, ", ", g.o, ", ", g.oh, ", ", g.ow,
           "] (check ", hw_name, ", strides and paddings)");
}

// How one convolution argument gets from Paddle's plain tensor to what the primitive
// wants (or back, for the output).
struct Arg {
  memory::desc plain;       // nchw / oihw: the Paddle tensor
  memory::desc blocked;     // what the primitive chose
  bool reorder = false;     // plain != blocked
  dnnl::reorder to_prim;    // plain -> blocked (inputs)
  dnnl::reorder from_prim;  // blocked -> plain (output)
};

struct Entry {
  dnnl::primitive conv;
  Arg src, wei, dst;  // conv's x, w, y (or their gradients, by op)
};

using Key = std::array<int64_t, 17>;

Key make_key(Kind kind, const Geometry& g, int threads) {
  return {kind, g.n,  g.c,  g.h,  g.w,  g.o,  g.kh, g.kw,   g.sh,
          g.sw, g.pt, g.pb, g.pl, g.pr, g.oh, g.ow, threads};
}

void init_arg(Arg& a, const memory::desc& plain, const memory::desc& chosen,
              bool is_output) {
  a.plain = plain;
  a.blocked = chosen;
  a.reorder = !(plain == chosen);
  if (!a.reorder) return;
  auto& eng = cpu_engine();
  if (is_output) {
    a.from_prim = dnnl::reorder(dnnl::reorder::primitive_desc(eng, chosen, eng, plain));
  } else {
    a.to_prim = dnnl::reorder(dnnl::reorder::primitive_desc(eng, plain, eng, chosen));
  }
}

// oneDNN's naive reference implementations are named "ref:...".
bool is_reference(const char* impl) { return std::string(impl).rfind("ref", 0) == 0; }

std::shared_ptr<Entry> create_entry(Kind kind, const Geometry& g) {
  auto& eng = cpu_engine();
  const memory::dims xd{g.n, g.c, g.h, g.w}, wd{g.o, g.c, g.kh, g.kw},
      yd{g.n, g.o, g.oh, g.ow}, strides{g.sh, g.sw}, pads_l{g.pt, g.pl},
      pads_r{g.pb, g.pr};
  const memory::desc x_plain(xd, Dt::f32, Tag::nchw), w_plain(wd, Dt::f32, Tag::oihw),
      y_plain(yd, Dt::f32, Tag::nchw);
  const memory::desc x_any(xd, Dt::f32, Tag::any), w_any(wd, Dt::f32, Tag::any),
      y_any(yd, Dt::f32, Tag::any), b_plain(memory::dims{g.o}, Dt::f32, Tag::a);
  // The backward primitives need the forward one as a hint (it fixes the layouts).
  const auto fwd =
      with_bias(kind)
          ? dnnl::convolution_forward::primitive_desc(
                eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                x_any, w_any, b_plain, y_any, strides, pads_l, pads_r)
          : dnnl::convolution_forward::primitive_desc(
                eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                x_any, w_any, y_any, strides, pads_l, pads_r);
  auto e = std::make_shared<Entry>();
  if (kind == kForward || kind == kForwardBias) {
    init_arg(e->src, x_plain, fwd.src_desc(), false);
    init_arg(e->wei, w_plain, fwd.weights_desc(), false);
    init_arg(e->dst, y_plain, fwd.dst_desc(), true);
    e->conv = dnnl::convolution_forward(fwd);
  } else if (kind == kBackwardData) {
    // The forward's activation layouts when an implementation takes them: left to choose
    // (format "any"), oneDNN may pick a channels-last kernel here whose transposing
    // reorders from and to Paddle's NCHW cost more than the kernel saves.
    // oneDNN's reference kernel takes any layout, so the forward's may only be served by
    // it (a plain NCHW x of 1-3 channels): 100x slower than letting oneDNN choose.
    dnnl::convolution_backward_data::primitive_desc bwd;
    bool chosen = false;
    try {
      bwd = dnnl::convolution_backward_data::primitive_desc(
          eng, dnnl::algorithm::convolution_direct, fwd.src_desc(), w_any, fwd.dst_desc(),
          strides, pads_l, pads_r, fwd);
      chosen = !is_reference(bwd.impl_info_str());
    } catch (const dnnl::error&) {
    }
    if (!chosen) {
      bwd = dnnl::convolution_backward_data::primitive_desc(
          eng, dnnl::algorithm::convolution_direct, x_any, w_any, y_any, strides, pads_l,
          pads_r, fwd);
    }
    init_arg(e->src, x_plain, bwd.diff_src_desc(), true);
    init_arg(e->wei, w_plain, bwd.weights_desc(), false);
    init_arg(e->dst, y_plain, bwd.diff_dst_desc(), false);
    e->conv = dnnl::convolution_backward_data(bwd);
  } else if (kind == kBackwardWeightBias) {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, x_any, w_any, b_plain, y_any, strides,
        pads_l, pads_r, fwd);
    init_arg(e->src, x_plain, bwd.src_desc(), false);
    init_arg(e->wei, w_plain, bwd.diff_weights_desc(), true);
    init_arg(e->dst, y_plain, bwd.diff_dst_desc(), false);
    e->conv = dnnl::convolution_backward_weights(bwd);
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, x_any, w_any, y_any, strides, pads_l,
        pads_r, fwd);
    init_arg(e->src, x_plain, bwd.src_desc(), false);
    init_arg(e->wei, w_plain, bwd.diff_weights_desc(), true);
    init_arg(e->dst, y_plain, bwd.diff_dst_desc(), false);
    e->conv = dnnl::convolution_backward_weights(bwd);
  }
  return e;
}

// Bounded LRU map Key -> Entry. Entries are shared_ptr so an evicted entry stays alive
// until the call using it returns.
class Cache {
 public:
  std::shared_ptr<Entry> get(Kind kind, const Geometry& g, int threads) {
    const Key key = make_key(kind, g, threads);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) {
        order_.splice(order_.begin(), order_, it->second.second);
        return it->second.first;
      }
    }
    // Created outside the lock (slow); a concurrent duplicate is harmless.
    auto entry = create_entry(kind, g);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key);
    if (it != map_.end()) return it->second.first;
    order_.push_front(key);
    map_.emplace(key, std::make_pair(entry, order_.begin()));
    while (map_.size() > kCacheCapacity) {
      map_.erase(order_.back());
      order_.pop_back();
    }
    return entry;
  }

 private:
  std::mutex mu_;
  std::list<Key> order_;  // most recently used first
  std::map<Key, std::pair<std::shared_ptr<Entry>, std::list<Key>::iterator>> map_;
};

Cache& cache() {
  static Cache c;
  return c;
}

// Scratch buffer for a blocked copy, from Paddle's allocator (it recycles blocks).
paddle::Tensor scratch(const memory::desc& d) {
  return paddle::empty({static_cast<int64_t>(d.get_size())}, paddle::DataType::UINT8,
                       paddle::CPUPlace());
}

void* data_of(const paddle::Tensor& t) { return const_cast<void*>(t.data()); }

// Blocked copies of forward inputs, kept for the filter gradient of the same convolution.
// A training step reorders every activation into the blocked layout for the forward and
// again for the filter gradient; the second copy is the first one. An entry holds the
// source tensor's storage too (not its autograd metadata, which would keep its graph
// alive), so its memory (and address, the key) cannot be reused while the entry exists;
// the filter-gradient op takes (removes) it. Entries never taken (a forward
// whose backward never runs) are dropped oldest first beyond kKeptBytes or kKeptEntries.
// Like any autograd, this assumes a convolution's input is not changed in place between
// its forward and backward.
constexpr size_t kKeptBytes = size_t{32} << 20;
constexpr size_t kKeptEntries = 32;

class KeptInputs {
 public:
  void put(const paddle::Tensor& source, const paddle::Tensor& blocked,
           const memory::desc& desc) {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.push_front({paddle::Tensor(source.impl()), blocked, desc});
    bytes_ += desc.get_size();
    while (!entries_.empty() && (bytes_ > kKeptBytes || entries_.size() > kKeptEntries)) {
      bytes_ -= entries_.back().desc.get_size();
      entries_.pop_back();
    }
  }

  // The kept blocked copy of `source` in layout `desc`, removed from the store; an
  // uninitialized tensor if there is none.
  paddle::Tensor take(const paddle::Tensor& source, const memory::desc& desc) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->source.data() == source.data() && it->source.numel() == source.numel() &&
          it->desc == desc) {
        paddle::Tensor blocked = it->blocked;
        bytes_ -= it->desc.get_size();
        entries_.erase(it);
        return blocked;
      }
    }
    return paddle::Tensor();
  }

 private:
  struct Entry {
    paddle::Tensor source, blocked;
    memory::desc desc;
  };
  std::mutex mu_;
  std::list<Entry> entries_;  // newest first
  size_t bytes_ = 0;
};

// Never destroyed: at process exit, freeing tensors after Paddle's allocator and Python
// are gone could crash or hang.
KeptInputs& kept_inputs() {
  static KeptInputs* k = new KeptInputs;
  return *k;
}

// An input argument as the primitive wants it: the tensor itself, or a blocked copy.
memory prepare_input(const Arg& a, const paddle::Tensor& t, std::vector<paddle::Tensor>& keep,
                     dnnl::stream& s) {
  memory plain(a.plain, cpu_engine(), data_of(t));
  if (!a.reorder) return plain;
  keep.push_back(scratch(a.blocked));
  memory blocked(a.blocked, cpu_engine(), data_of(keep.back()));
  a.to_prim.execute(s, plain, blocked);
  return blocked;
}

// Runs one convolution. `in0`/`in1` are the op's inputs, `out` its (plain) output;
// which conv argument each one is depends on the op. `bias` is the bias (forward) or its
// gradient (backward weights) of the bias variants, a plain [O] vector; null otherwise.
void run(Kind kind, const Geometry& g, int threads, const paddle::Tensor& in0,
         const paddle::Tensor& in1, paddle::Tensor& out, paddle::Tensor* bias = nullptr,
         bool keep_src = false) {
  const char* op = kind_name(kind);
  PD_CHECK(threads >= 1, op, ": threads must be >= 1, got ", threads);
  ThreadGuard guard(threads);
  try {
    auto e = cache().get(kind, g, threads);
    auto& s = thread_stream();
    std::vector<paddle::Tensor> keep;  // scratch buffers, alive until the stream waits
    // Argument roles per op: (input 0, input 1, output).
    const Arg* a0;
    const Arg* a1;
    const Arg* ao;
    int k0, k1, ko;
    if (kind == kForward || kind == kForwardBias) {
      a0 = &e->src, a1 = &e->wei, ao = &e->dst;
      k0 = DNNL_ARG_SRC, k1 = DNNL_ARG_WEIGHTS, ko = DNNL_ARG_DST;
    } else if (kind == kBackwardData) {
      a0 = &e->dst, a1 = &e->wei, ao = &e->src;
      k0 = DNNL_ARG_DIFF_DST, k1 = DNNL_ARG_WEIGHTS, ko = DNNL_ARG_DIFF_SRC;
    } else {
      a0 = &e->src, a1 = &e->dst, ao = &e->wei;
      k0 = DNNL_ARG_SRC, k1 = DNNL_ARG_DIFF_DST, ko = DNNL_ARG_DIFF_WEIGHTS;
    }
    const bool forward = kind == kForward || kind == kForwardBias;
    const bool filter_gradient = kind == kBackwardWeight || kind == kBackwardWeightBias;
    paddle::Tensor kept;  // in0 (x) as a forward of the same convolution left it
    if (filter_gradient && a0->reorder) kept = kept_inputs().take(in0, a0->blocked);
    memory m0;
    if (kept.initialized()) {
      m0 = memory(a0->blocked, cpu_engine(), data_of(kept));
      keep.push_back(kept);
    } else {
      m0 = prepare_input(*a0, in0, keep, s);
      // Kept only for a filter gradient that runs on oneDNN and so can use it.
      if (forward && keep_src && a0->reorder && !gemm_filter_gradient_applies(g)) {
        kept_inputs().put(in0, keep.back(), a0->blocked);
      }
    }
    memory m1 = prepare_input(*a1, in1, keep, s);
    memory out_plain(ao->plain, cpu_engine(), data_of(out));
    memory mo = out_plain;
    if (ao->reorder) {
      keep.push_back(scratch(ao->blocked));
      mo = memory(ao->blocked, cpu_engine(), data_of(keep.back()));
    }
    std::unordered_map<int, memory> args{{k0, m0}, {k1, m1}, {ko, mo}};
    if (with_bias(kind)) {
      PD_CHECK(bias != nullptr, op, ": the bias tensor is missing");
      const memory::desc b_plain(memory::dims{g.o}, Dt::f32, Tag::a);
      args.emplace(kind == kForwardBias ? DNNL_ARG_BIAS : DNNL_ARG_DIFF_BIAS,
                   memory(b_plain, cpu_engine(), data_of(*bias)));
    }
    e->conv.execute(s, args);
    if (ao->reorder) ao->from_prim.execute(s, mo, out_plain);
    s.wait();
  } catch (const dnnl::error& err) {
    PD_THROW(op, ": oneDNN error: ", err.what(), " (status ", static_cast<int>(err.status),
             ")");
  }
}

paddle::Tensor contiguous(const paddle::Tensor& t) {
  return t.is_contiguous() ? t : t.contiguous();
}

}  // namespace

// ------------------------------------------------------------------------- kernels

namespace {
void gemm_forward(const Geometry& g, int threads, const paddle::Tensor& x,
                  const paddle::Tensor& w, const paddle::Tensor* b, paddle::Tensor& y);

// The forward op, with (b != nullptr) or without the folded bias.
std::vector<paddle::Tensor> forward(Kind kind, const paddle::Tensor& x, const paddle::Tensor& w,
                                    const paddle::Tensor* b, const std::vector<int>& strides,
                                    const std::vector<int>& paddings, int keep, int threads) {
  const char* op = kind_name(kind);
  check_tensor(op, "x", x);
  check_tensor(op, "w", w);
  if (b != nullptr) check_tensor(op, "b", *b, 1);
  const Geometry g = make_geometry(op, x.shape(), w.shape(), strides, paddings);
  PD_CHECK(b == nullptr || b->numel() == g.o, op,
           ": the bias must have one entry per output channel (", g.o, "), got ",
           b == nullptr ? 0 : b->numel());
  auto y = paddle::empty({g.n, g.o, g.oh, g.ow}, paddle::DataType::FLOAT32,
                         paddle::CPUPlace());
  paddle::Tensor bias = b == nullptr ? paddle::Tensor() : contiguous(*b);
  if (g.n > 0 && gemm_filter_gradient_applies(g)) {
    PD_CHECK(threads >= 1, op, ": threads must be >= 1, got ", threads);
    gemm_forward(g, threads, contiguous(x), contiguous(w), b == nullptr ? nullptr : &bias, y);
  } else if (g.n > 0) {
    run(kind, g, threads, contiguous(x), contiguous(w), y, b == nullptr ? nullptr : &bias,
        keep != 0);
  }
  return {y};
}
}  // namespace

std::vector<paddle::Tensor> ForwardKernel(const paddle::Tensor& x, const paddle::Tensor& w,
                                          const std::vector<int>& strides,
                                          const std::vector<int>& paddings, int keep,
                                          int threads) {
  return forward(kForward, x, w, nullptr, strides, paddings, keep, threads);
}

std::vector<paddle::Tensor> ForwardBiasKernel(const paddle::Tensor& x, const paddle::Tensor& w,
                                              const paddle::Tensor& b,
                                              const std::vector<int>& strides,
                                              const std::vector<int>& paddings, int keep,
                                              int threads) {
  return forward(kForwardBias, x, w, &b, strides, paddings, keep, threads);
}

std::vector<paddle::Tensor> BackwardDataKernel(const paddle::Tensor& dy,
                                               const paddle::Tensor& w,
                                               const std::vector<int>& strides,
                                               const std::vector<int>& paddings,
                                               const std::vector<int>& input_hw,
                                               int threads) {
  const char* op = kind_name(kBackwardData);
  check_tensor(op, "dy", dy);
  check_tensor(op, "w", w);
  check_pair(op, "input_hw", input_hw, 1);
  const auto ds = dy.shape();
  const auto ws = w.shape();
  const std::vector<int64_t> xs{ds[0], ws[1], input_hw[0], input_hw[1]};
  PD_CHECK(ds[1] == ws[0], op, ": dy has ", ds[1], " channels but the weight has ", ws[0],
           " output channels");
  const Geometry g = make_geometry(op, xs, ws, strides, paddings);
  check_dy(op, g, ds, "input_hw");
  auto dx = paddle::empty(xs, paddle::DataType::FLOAT32, paddle::CPUPlace());
  if (g.n > 0) run(kBackwardData, g, threads, contiguous(dy), contiguous(w), dx);
  return {dx};
}

namespace {
// The filter gradient, and with kind kBackwardWeightBias also the bias gradient.
// Output rows [oy0, oy1) of image x [C, H, W] unfolded: col [C*KH*KW + 1, rows*OW], zero
// where the window leaves the image, and a last row of ones, whose product with dy is the
// bias gradient.
void im2col_rows(const Geometry& g, const float* x, int64_t oy0, int64_t oy1, float* col) {
  const int64_t width = (oy1 - oy0) * g.ow;
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        float* out = col + ((c * g.kh + i) * g.kw + j) * width;
        for (int64_t oy = oy0; oy < oy1; ++oy) {
          const int64_t y = oy * g.sh - g.pt + i;
          float* row = out + (oy - oy0) * g.ow;
          if (y < 0 || y >= g.h) {
            std::fill(row, row + g.ow, 0.0f);
            continue;
          }
          const float* src = x + (c * g.h + y) * g.w;
          for (int64_t ox = 0; ox < g.ow; ++ox) {
            const int64_t xx = ox * g.sw - g.pl + j;
            row[ox] = (xx < 0 || xx >= g.w) ? 0.0f : src[xx];
          }
        }
      }
    }
  }
  float* ones = col + g.c * g.kh * g.kw * width;
  std::fill(ones, ones + width, 1.0f);
}

// Runs body(member, n, oy0, width, col) for every image n and every block of output rows
// starting at oy0 (width = rows * OW output pixels), small enough for the unfolded block
// col [C*KH*KW + 1, width] (see im2col_rows) to stay in cache; the images are split
// between `teams` OpenMP threads, `member` being the caller's. False from body is a
// failure, reported as the result.
template <typename Body>
bool for_each_unfolded_block(const Geometry& g, int teams, const float* xp, Body body) {
  const int64_t k1 = g.c * g.kh * g.kw + 1;
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(g.oh, 16384 / (k1 * g.ow)));
  bool failed = false;
#pragma omp parallel num_threads(teams)
  {
    std::vector<float> col(k1 * rows * g.ow);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < g.n; ++n) {
      const float* xn = xp + n * g.c * g.h * g.w;
      for (int64_t oy0 = 0; oy0 < g.oh; oy0 += rows) {
        const int64_t oy1 = std::min(g.oh, oy0 + rows), width = (oy1 - oy0) * g.ow;
        im2col_rows(g, xn, oy0, oy1, col.data());
        if (!body(omp_get_thread_num(), n, oy0, width, col.data())) {
#pragma omp atomic write
          failed = true;
        }
      }
    }
  }
  return !failed;
}

int gemm_teams(const Geometry& g, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, g.n)));
}

// dw (and db) as described at gemm_filter_gradient_applies: per image and block of output
// rows, acc [O, K + 1] += dy block [O, rows*OW] x col^T with oneDNN's sgemm; column K of
// acc is the bias gradient. Each thread sums into its own acc.
void gemm_filter_gradient(const Geometry& g, int threads, const paddle::Tensor& x,
                          const paddle::Tensor& dy, paddle::Tensor& dw, paddle::Tensor* db) {
  ThreadGuard guard(threads);  // sgemm's own threads when one team runs it
  const int64_t k = g.c * g.kh * g.kw, k1 = k + 1, p = g.oh * g.ow, o = g.o;
  const int teams = gemm_teams(g, threads);
  std::vector<std::vector<float>> part(teams, std::vector<float>(o * k1, 0.0f));
  const float* dyp = dy.data<float>();
  const bool ok = for_each_unfolded_block(
      g, teams, x.data<float>(),
      [&](int member, int64_t n, int64_t oy0, int64_t width, const float* col) {
        // Row-major: acc [o, k1] += dy_n[:, block] [o, width] x col^T.
        const float* a = dyp + n * o * p + oy0 * g.ow;
        return dnnl_sgemm('N', 'T', o, k1, width, 1.0f, a, p, col, width, 1.0f,
                          part[member].data(), k1) == dnnl_success;
      });
  PD_CHECK(ok, "onednn_conv2d_backward_weight: dnnl_sgemm failed");
  for (int t = 1; t < teams; ++t) {
    for (int64_t i = 0; i < o * k1; ++i) part[0][i] += part[t][i];
  }
  float* w_out = dw.data<float>();
  for (int64_t c = 0; c < o; ++c) {
    std::copy(part[0].begin() + c * k1, part[0].begin() + c * k1 + k, w_out + c * k);
  }
  if (db != nullptr) {
    float* b_out = db->data<float>();
    for (int64_t c = 0; c < o; ++c) b_out[c] = part[0][c * k1 + k];
  }
}

// The forward of a convolution with few input channels, by the same unfolding: per image
// and block of output rows, y_n[:, block] = [w | b] [O, K + 1] x col [K + 1, rows*OW]
// (the ones row of col adds the bias), written straight into Paddle's plain NCHW output.
// oneDNN's kernel would write a blocked output whose reorder to NCHW costs more than the
// convolution itself here (the first Omniglot layer: 64 channels of 14x14 out of 1).
void gemm_forward(const Geometry& g, int threads, const paddle::Tensor& x,
                  const paddle::Tensor& w, const paddle::Tensor* b, paddle::Tensor& y) {
  ThreadGuard guard(threads);
  const int64_t k = g.c * g.kh * g.kw, k1 = k + 1, p = g.oh * g.ow, o = g.o;
  std::vector<float> wb(o * k1);
  const float* wp = w.data<float>();
  const float* bp = b == nullptr ? nullptr : b->data<float>();
  for (int64_t c = 0; c < o; ++c) {
    std::copy(wp + c * k, wp + c * k + k, wb.begin() + c * k1);
    wb[c * k1 + k] = bp == nullptr ? 0.0f : bp[c];
  }
  float* yp = y.data<float>();
  const bool ok = for_each_unfolded_block(
      g, gemm_teams(g, threads), x.data<float>(),
      [&](int, int64_t n, int64_t oy0, int64_t width, const float* col) {
        // Row-major: y_n[:, block] [o, width] = wb [o, k1] x col [k1, width].
        float* out = yp + n * o * p + oy0 * g.ow;
        return dnnl_sgemm('N', 'N', o, width, k1, 1.0f, wb.data(), k1, col, width, 0.0f, out,
                          p) == dnnl_success;
      });
  PD_CHECK(ok, "onednn_conv2d_forward: dnnl_sgemm failed");
}

std::vector<paddle::Tensor> backward_weight(Kind kind, const paddle::Tensor& x,
                                            const paddle::Tensor& dy,
                                            const std::vector<int>& strides,
                                            const std::vector<int>& paddings,
                                            const std::vector<int>& kernel_hw, int threads) {
  const char* op = kind_name(kind);
  check_tensor(op, "x", x);
  check_tensor(op, "dy", dy);
  check_pair(op, "kernel_hw", kernel_hw, 1);
  const auto xs = x.shape();
  const auto ds = dy.shape();
  const std::vector<int64_t> ws{ds[1], xs[1], kernel_hw[0], kernel_hw[1]};
  const Geometry g = make_geometry(op, xs, ws, strides, paddings);
  check_dy(op, g, ds, "kernel_hw");
  const bool with_db = kind == kBackwardWeightBias;
  const auto cpu = paddle::CPUPlace();
  if (g.n == 0) {  // an empty batch: zero gradients
    std::vector<paddle::Tensor> zeros{paddle::full(ws, 0.0, paddle::DataType::FLOAT32, cpu)};
    if (with_db) zeros.push_back(paddle::full({g.o}, 0.0, paddle::DataType::FLOAT32, cpu));
    return zeros;
  }
  auto dw = paddle::empty(ws, paddle::DataType::FLOAT32, cpu);
  paddle::Tensor db;
  if (with_db) db = paddle::empty({g.o}, paddle::DataType::FLOAT32, cpu);
  if (gemm_filter_gradient_applies(g)) {
    PD_CHECK(threads >= 1, op, ": threads must be >= 1, got ", threads);
    gemm_filter_gradient(g, threads, contiguous(x), contiguous(dy), dw,
                         with_db ? &db : nullptr);
  } else {
    run(kind, g, threads, contiguous(x), contiguous(dy), dw, with_db ? &db : nullptr);
  }
  if (!with_db) return {dw};
  return {dw, db};
}
}  // namespace

std::vector<paddle::Tensor> BackwardWeightKernel(const paddle::Tensor& x,
                                                 const paddle::Tensor& dy,
                                                 const std::vector<int>& strides,
                                                 const std::vector<int>& paddings,
                                                 const std::vector<int>& kernel_hw,
                                                 int threads) {
  return backward_weight(kBackwardWeight, x, dy, strides, paddings, kernel_hw, threads);
}

std::vector<paddle::Tensor> BackwardWeightBiasKernel(const paddle::Tensor& x,
                                                     const paddle::Tensor& dy,
                                                     const std::vector<int>& strides,
                                                     const std::vector<int>& paddings,
                                                     const std::vector<int>& kernel_hw,
                                                     int threads) {
  return backward_weight(kBackwardWeightBias, x, dy, strides, paddings, kernel_hw, threads);
}

// ------------------------------------------------------- shape / dtype inference
// Only used when building a static graph; dims may be -1 (unknown) there.

namespace {
int64_t infer_out(int64_t in, int64_t k, int s, int before, int after) {
  return (in < 0 || k < 0) ? -1 : out_size(in, k, s, before, after);
}
}  // namespace

std::vector<std::vector<int64_t>> ForwardShape(const std::vector<int64_t>& x,
                                               const std::vector<int64_t>& w,
                                               const std::vector<int>& strides,
                                               const std::vector<int>& paddings, int, int) {
  const bool sides = paddings.size() == 4;  // {top, bottom, left, right}
  const int top = paddings[0], bottom = paddings[sides ? 1 : 0];
  const int left = paddings[sides ? 2 : 1], right = paddings[sides ? 3 : 1];
  return {{x[0], w[0], infer_out(x[2], w[2], strides[0], top, bottom),
           infer_out(x[3], w[3], strides[1], left, right)}};
}

std::vector<std::vector<int64_t>> BackwardDataShape(const std::vector<int64_t>& dy,
                                                    const std::vector<int64_t>& w,
                                                    const std::vector<int>&,
                                                    const std::vector<int>&,
                                                    const std::vector<int>& input_hw, int) {
  return {{dy[0], w[1], input_hw[0], input_hw[1]}};
}

std::vector<std::vector<int64_t>> BackwardWeightShape(const std::vector<int64_t>& x,
                                                      const std::vector<int64_t>& dy,
                                                      const std::vector<int>&,
                                                      const std::vector<int>&,
                                                      const std::vector<int>& kernel_hw,
                                                      int) {
  return {{dy[1], x[1], kernel_hw[0], kernel_hw[1]}};
}

std::vector<paddle::DataType> Float32(const paddle::DataType&, const paddle::DataType&) {
  return {paddle::DataType::FLOAT32};
}

std::vector<std::vector<int64_t>> ForwardBiasShape(const std::vector<int64_t>& x,
                                                   const std::vector<int64_t>& w,
                                                   const std::vector<int64_t>&,
                                                   const std::vector<int>& strides,
                                                   const std::vector<int>& paddings, int k,
                                                   int t) {
  return ForwardShape(x, w, strides, paddings, k, t);
}

std::vector<std::vector<int64_t>> BackwardWeightBiasShape(const std::vector<int64_t>& x,
                                                          const std::vector<int64_t>& dy,
                                                          const std::vector<int>&,
                                                          const std::vector<int>&,
                                                          const std::vector<int>& kernel_hw,
                                                          int) {
  return {{dy[1], x[1], kernel_hw[0], kernel_hw[1]}, {dy[1]}};
}

std::vector<paddle::DataType> Float32Of3(const paddle::DataType&, const paddle::DataType&,
                                         const paddle::DataType&) {
  return {paddle::DataType::FLOAT32};
}

std::vector<paddle::DataType> Float32x2(const paddle::DataType&, const paddle::DataType&) {
  return {paddle::DataType::FLOAT32, paddle::DataType::FLOAT32};
}

PD_BUILD_OP(onednn_conv2d_forward)
    .Inputs({"X", "W"})
    .Outputs({"Y"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "keep: int",
            "threads: int"})
    .SetKernelFn(PD_KERNEL(ForwardKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(ForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32));

PD_BUILD_OP(onednn_conv2d_backward_data)
    .Inputs({"DY", "W"})
    .Outputs({"DX"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>",
            "input_hw: std::vector<int>", "threads: int"})
    .SetKernelFn(PD_KERNEL(BackwardDataKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(BackwardDataShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32));

PD_BUILD_OP(onednn_conv2d_backward_weight)
    .Inputs({"X", "DY"})
    .Outputs({"DW"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>",
            "kernel_hw: std::vector<int>", "threads: int"})
    .SetKernelFn(PD_KERNEL(BackwardWeightKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(BackwardWeightShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32));

PD_BUILD_OP(onednn_conv2d_forward_bias)
    .Inputs({"X", "W", "B"})
    .Outputs({"Y"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "keep: int",
            "threads: int"})
    .SetKernelFn(PD_KERNEL(ForwardBiasKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(ForwardBiasShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32Of3));

PD_BUILD_OP(onednn_conv2d_backward_weight_bias)
    .Inputs({"X", "DY"})
    .Outputs({"DW", "DB"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>",
            "kernel_hw: std::vector<int>", "threads: int"})
    .SetKernelFn(PD_KERNEL(BackwardWeightBiasKernel))
    .SetInferShapeFn(PD_INFER_SHAPE(BackwardWeightBiasShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32x2));
