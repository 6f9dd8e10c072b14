// Exact top-k of queries · corpusᵀ on the CPU, scored and selected in one pass over the corpus.
//
// Built and loaded by native_search.py as an XLA FFI custom call. XLA's matrix product of a
// handful of queries with a large [N, D] corpus costs about three reads of the corpus or more
// on the CPU; this kernel reads each corpus row once, scores it against every query from registers,
// and keeps a running top-k per query, so the search costs little more than one read.
//
// Inputs: queries f32[B, D], corpus f32 or bf16[N, D], mask pred[N] (false = never retrieved).
// Outputs: scores f32[B, k], indices s32[B, k], best first; ties go to the lower row index,
// as in lax.top_k, whose total order of floats (NaN by its sign beyond the infinities) this
// follows; zero scores are +0.0. Masked rows score the attribute `masked_score` (-1e12 in the
// model). The attribute `threads` caps the threads (0: one per core, if the corpus is large).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif
#include <cerrno>
#include <cmath>
#include <unistd.h>

#ifdef __AVX512BW__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// kLanes queries per vector, kTileRows corpus rows scored together: one accumulator vector per
// row, plus the queries, must fit the vector registers (AVX-512: 32 of 16 floats; AVX2: 16 of 8
// floats; NEON: 32 of 4 floats, two per vector here).
#ifdef __AVX512F__
constexpr int kLanes = 16;
constexpr int kTileRows = 16;
#else
constexpr int kLanes = 8;
constexpr int kTileRows = 12;
#endif
constexpr int64_t kPrefetchTiles = 3;        // tiles ahead to prefetch
constexpr int64_t kRowsPerThread = 1 << 15;  // fewer rows than this: not worth a thread

typedef float Floats __attribute__((vector_size(4 * kLanes)));  // one lane per query
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNegInf = -kInf;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// lax.top_k orders floats totally (-0.0 below +0.0): compare these integer keys instead.
inline int32_t OrderKey(float score) {
  int32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

struct Entry {
  int32_t key;  // OrderKey(score)
  int32_t index;
  float score;
};

// Higher score first; among equal scores, lower row index first (lax.top_k's order).
inline bool Better(const Entry& a, const Entry& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}

// Running top-k of one query over rows pushed in increasing index order.
class RunningTopK {
 public:
  explicit RunningTopK(int k) : k_(k) { entries_.reserve(2 * k); }

  // Until k rows are held every row is taken; then only rows scoring above the k-th best (a
  // later row with an equal score loses the tie to the earlier one).
  bool full() const { return full_; }
  float threshold() const { return threshold_; }

  void Push(float score, int32_t index) {
    int32_t key = OrderKey(score);
    if (full_ && key <= threshold_key_) return;
    entries_.push_back({key, index, score});
    if (static_cast<int>(entries_.size()) == (full_ ? 2 * k_ : k_)) Shrink();
  }

  std::vector<Entry>& entries() { return entries_; }

 private:
  void Shrink() {
    std::nth_element(entries_.begin(), entries_.begin() + (k_ - 1), entries_.end(), Better);
    entries_.resize(k_);
    threshold_ = entries_[k_ - 1].score;
    threshold_key_ = entries_[k_ - 1].key;
    full_ = true;
  }

  int k_;
  bool full_ = false;
  float threshold_ = kNegInf;
  int32_t threshold_key_ = 0;
  std::vector<Entry> entries_;
};

// rows [R, D] (float32) against one chunk of kLanes queries, queries_t [D, padded B]. The rows are
// read column by column, which the hardware prefetcher does not follow well; so each step also
// asks for `ahead_step` bytes of the corpus `ahead` (a tile scored a little later), spreading
// the requests over the loop. (A prefetch is only a hint: it never faults, even past the end.)
template <int R>
inline void ScoreTile(const float* rows, int64_t d, const float* queries_t, int64_t stride,
                      uintptr_t ahead, int64_t ahead_step, Floats (&acc)[R]) {
  // Sums start at +0.0, so a zero score is always +0.0 (as in XLA's products of more than one
  // term; XLA's single-term product may give -0.0, which lax.top_k ranks below +0.0).
  for (int r = 0; r < R; ++r) acc[r] = Floats{};
  for (int64_t j = 0; j < d; ++j) {
    if (ahead_step) __builtin_prefetch(reinterpret_cast<const void*>(ahead + j * ahead_step));
    Floats q;
    std::memcpy(&q, queries_t + j * stride, sizeof(q));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] += rows[r * d + j] * q;
  }
}

inline void ToFloat(const uint16_t* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    U16x16 half;
    std::memcpy(&half, src + i, sizeof(half));
    U32x16 bits = __builtin_convertvector(half, U32x16) << 16;
    std::memcpy(dst + i, &bits, sizeof(bits));
  }
  for (; i < count; ++i) {
    uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof(bits));
  }
}

struct Problem {
  const float* queries_t;  // [D, padded B], zero beyond B
  int64_t num_queries, padded, d;
  const void* corpus;
  bool bf16;
  const bool* mask;
  float masked_score;
  int k;
};

// One thread's running lists, and each list's bar as a row of floats for vector compares:
// NaN while a list is still open (every row enters), its threshold once full, +inf for the
// padding lanes beyond the last query.
struct Lists {
  Lists(int64_t num_queries, int64_t padded, int k)
      : best(num_queries, RunningTopK(k)), bar(padded, kInf) {
    std::fill(bar.begin(), bar.begin() + num_queries, kNaN);
  }
  void Push(int64_t q, float score, int32_t index) {
    best[q].Push(score, index);
    if (best[q].full()) bar[q] = best[q].threshold();  // a NaN threshold: every row is looked at
  }
  std::vector<RunningTopK> best;
  std::vector<float> bar;
};

inline bool AnySet(Ints v) {
  uint64_t words[sizeof(Ints) / sizeof(uint64_t)];
  std::memcpy(words, &v, sizeof(v));
  uint64_t any = 0;
  for (uint64_t w : words) any |= w;
  return any != 0;
}

template <int R>
void ScanTile(const Problem& p, int64_t start, const float* rows, Lists& lists) {
  // The tile kPrefetchTiles ahead: R rows of D elements take R * element bytes per column.
  const int64_t element = p.bf16 ? 2 : 4;
  const int64_t ahead_step = R == kTileRows ? R * element : 0;
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(p.corpus) +
                          (start + kPrefetchTiles * R) * p.d * element;
  Floats acc[R];
  Ints hits[R];
  for (int64_t chunk = 0; chunk < p.padded; chunk += kLanes) {
    ScoreTile<R>(rows, p.d, p.queries_t + chunk, p.padded, chunk ? 0 : ahead, chunk ? 0 : ahead_step, acc);
    if (p.mask) {
      // A masked row still enters an open list: lax.top_k returns masked rows when fewer than
      // k rows are kept.
      for (int r = 0; r < R; ++r) {
        if (!p.mask[start + r]) acc[r] = Floats{} + p.masked_score;
      }
    }
    Floats bar;
    std::memcpy(&bar, lists.bar.data() + chunk, sizeof(bar));
    Ints any = Ints{};
    for (int r = 0; r < R; ++r) {
      // At or above the bar (Push decides ties), NaN, or the bar is NaN (open list).
      hits[r] = ~(acc[r] < bar);
      any |= hits[r];
    }
    if (!AnySet(any)) continue;
    int lanes = static_cast<int>(std::min<int64_t>(kLanes, p.num_queries - chunk));
    for (int r = 0; r < R; ++r) {
      if (!AnySet(hits[r])) continue;
      for (int q = 0; q < lanes; ++q) {
        if (hits[r][q]) lists.Push(chunk + q, acc[r][q], static_cast<int32_t>(start + r));
      }
    }
  }
}

// The sum of a vector's lanes as a tree of halves: a chain of log2(kLanes) dependent adds
// instead of kLanes.
template <typename V, int N>
inline float SumLanes(V v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    typedef float Half __attribute__((vector_size(sizeof(V) / 2)));
    Half lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return SumLanes<Half, N / 2>(lo + hi);
  }
}

// One element of a row as a float.
inline float Element(const Problem& p, int64_t offset) {
  if (!p.bf16) return static_cast<const float*>(p.corpus)[offset];
  uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p.corpus)[offset]) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// One query: each row's score is its dot product with the query, summed along the row in
// vector lanes and then across them, so that every multiply-add is useful (the lane-per-query
// layout above would use one lane in kLanes) and the scan is bound by the read. A bfloat16 row
// is read as 32-bit words of two elements, 2i in the low half and 2i + 1 in the high one: the
// high half is a float once the low bits are cleared and the low half once shifted up, so the
// words are multiplied by the query's even and odd elements without unpacking the row.
template <bool kBf16>
void ScanRowsOneQuery(const Problem& p, int64_t begin, int64_t end, Lists& lists) {
  typedef uint32_t Words __attribute__((vector_size(4 * kLanes)));
  constexpr int64_t kStep = kBf16 ? 2 * kLanes : kLanes;  // elements per vector of the row
  const int64_t d = p.d, vectors = d / kStep, body = vectors * kStep;
  std::vector<Floats> even(vectors), odd(vectors);  // float32 rows: `even` holds the query
  for (int64_t j = 0; j < body; ++j) {
    float q = p.queries_t[j * p.padded];
    if (kBf16) {
      (j % 2 ? odd : even)[j / kStep][j % kStep / 2] = q;
    } else {
      even[j / kStep][j % kStep] = q;
    }
  }
  const Words high_half = Words{} + 0xffff0000u;
  RunningTopK& best = lists.best[0];
  for (int64_t row = begin; row < end; ++row) {
    Floats acc = Floats{}, acc_odd = Floats{};
    for (int64_t v = 0; v < vectors; ++v) {
      Floats x;
      if (kBf16) {
        Words words;
        std::memcpy(&words, static_cast<const uint16_t*>(p.corpus) + row * d + v * kStep,
                    sizeof(words));
        Words low = words << 16, high = words & high_half;
        Floats x_odd;
        std::memcpy(&x, &low, sizeof(x));
        std::memcpy(&x_odd, &high, sizeof(x_odd));
        acc_odd += x_odd * odd[v];
      } else {
        std::memcpy(&x, static_cast<const float*>(p.corpus) + row * d + v * kStep, sizeof(x));
      }
      acc += x * even[v];
    }
    float score = SumLanes<Floats, kLanes>(acc + acc_odd);
    for (int64_t j = body; j < d; ++j) score += Element(p, row * d + j) * p.queries_t[j * p.padded];
    score += 0.0f;  // a zero sum is +0.0, as on the many-query path
    if (p.mask && !p.mask[row]) score = p.masked_score;
    // At or above the bar (Push decides ties), NaN, or the list is still open.
    if (!best.full() || !(score < best.threshold())) best.Push(score, static_cast<int32_t>(row));
  }
}

void ScanRows(const Problem& p, int64_t begin, int64_t end, Lists& lists) {
  if (p.num_queries == 1) {
    return p.bf16 ? ScanRowsOneQuery<true>(p, begin, end, lists)
                  : ScanRowsOneQuery<false>(p, begin, end, lists);
  }
  std::vector<float> buffer(p.bf16 ? kTileRows * p.d : 0);
  auto rows_at = [&](int64_t start, int64_t count) -> const float* {
    // float32 rows are read in place (the hardware prefetcher follows the stream); bfloat16
    // rows are widened into a small buffer that stays in L1.
    if (!p.bf16) return static_cast<const float*>(p.corpus) + start * p.d;
    ToFloat(static_cast<const uint16_t*>(p.corpus) + start * p.d, count * p.d, buffer.data());
    return buffer.data();
  };
  int64_t start = begin;
  for (; start + kTileRows <= end; start += kTileRows) {
    ScanTile<kTileRows>(p, start, rows_at(start, kTileRows), lists);
  }
  for (; start < end; ++start) ScanTile<1>(p, start, rows_at(start, 1), lists);
}

// `requested` > 0: that many (at most one per tile); 0: one per core, each with enough rows.
int NumThreads(int64_t n, int64_t requested) {
  int64_t tiles = std::max<int64_t>(1, n / kTileRows);
  if (requested > 0) return static_cast<int>(std::min(requested, tiles));
  int64_t cores = std::max(1u, std::thread::hardware_concurrency());
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cores = std::max(1, CPU_COUNT(&set));
#endif
  int64_t useful = std::max<int64_t>(1, n / kRowsPerThread);
  return static_cast<int>(std::min(cores, useful));
}

// Scans rows [0, n) in contiguous ranges, one per thread, each thread into its own running
// lists (`scan(begin, end, lists)`), then merges the lists into the outputs [B, k]. A range whose
// thread cannot be started is scanned by this one.
template <typename Scan>
ffi::Error SearchRows(int64_t n, int64_t b, int64_t padded, int k, int64_t requested_threads,
                      Scan scan, float* scores, int32_t* indices) {
  const int threads = NumThreads(n, requested_threads);
  std::vector<Lists> lists(threads, Lists(b, padded, k));
  auto range = [&](int t) {
    int64_t per = (n + threads - 1) / threads;
    per = (per + kTileRows - 1) / kTileRows * kTileRows;
    return std::make_pair(std::min(n, t * per), std::min(n, (t + 1) * per));
  };
  std::atomic<bool> failed{false};
  auto run = [&](int t) {
    try {
      auto [begin, end] = range(t);
      scan(begin, end, lists[t]);
    } catch (const std::exception&) {
      failed = true;
    }
  };
  std::vector<std::thread> workers;
  std::vector<int> unstarted;
  for (int t = 1; t < threads; ++t) {
    try {
      workers.emplace_back(run, t);
    } catch (const std::system_error&) {
      unstarted.push_back(t);
    }
  }
  run(0);
  for (int t : unstarted) run(t);
  for (auto& w : workers) w.join();
  if (failed) return ffi::Error::Internal("phoenix_top_k: out of memory");

  std::vector<Entry> merged;
  for (int64_t q = 0; q < b; ++q) {
    merged.clear();
    for (int t = 0; t < threads; ++t) {
      auto& e = lists[t].best[q].entries();
      merged.insert(merged.end(), e.begin(), e.end());
    }
    std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), Better);
    for (int64_t i = 0; i < k; ++i) {
      scores[q * k + i] = merged[i].score;
      indices[q * k + i] = merged[i].index;
    }
  }
  return ffi::Error::Success();
}

// The sizes of a search: queries [B, D], corpus [N, D], a vector [N] beside the corpus (the
// mask or the scales) and outputs [B, k], with 1 <= k <= N < 2**31.
struct Sizes {
  int64_t b, d, n, k;
};

template <typename Queries, typename Corpus, typename PerRow, typename Outputs>
ffi::Error CheckSizes(const std::string& name, const Queries& queries, const Corpus& corpus,
                      const PerRow& per_row, const Outputs& outputs, Sizes& sizes) {
  auto q = queries.dimensions(), c = corpus.dimensions(), r = per_row.dimensions();
  auto o = outputs.dimensions();
  if (q.size() != 2 || c.size() != 2 || o.size() != 2 || r.size() != 1) {
    return ffi::Error::InvalidArgument(
        name + ": queries, corpus and outputs must be 2-D, the per-row vector 1-D");
  }
  sizes = Sizes{q[0], q[1], c[0], o[1]};
  if (c[1] != sizes.d || o[0] != sizes.b || r[0] != sizes.n) {
    return ffi::Error::InvalidArgument(name + ": mismatched shapes");
  }
  if (sizes.k < 1 || sizes.k > sizes.n || sizes.n > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument(name + ": need 1 <= k <= N < 2**31");
  }
  return ffi::Error::Success();
}

// `search()`, with no exception crossing into XLA.
template <typename Search>
ffi::Error Guarded(const std::string& name, Search search) {
  try {
    return search();
  } catch (const std::exception&) {
    return ffi::Error::Internal(name + ": out of memory");
  }
}

ffi::Error TopK(ffi::Buffer<ffi::F32> queries, ffi::AnyBuffer corpus, ffi::Buffer<ffi::PRED> mask,
                float masked_score, int64_t requested_threads,
                ffi::Result<ffi::Buffer<ffi::F32>> scores,
                ffi::Result<ffi::Buffer<ffi::S32>> indices) {
  Sizes sizes;
  ffi::Error error = CheckSizes("phoenix_top_k", queries, corpus, mask, *scores, sizes);
  if (error.failure()) return error;
  const auto [b, d, n, k] = sizes;
  bool bf16 = corpus.element_type() == ffi::BF16;
  if (!bf16 && corpus.element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("phoenix_top_k: corpus must be float32 or bfloat16");
  }

  const int64_t padded = (b + kLanes - 1) / kLanes * kLanes;
  std::vector<float> queries_t(d * padded, 0.0f);
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < d; ++j) queries_t[j * padded + i] = queries.typed_data()[i * d + j];
  }
  Problem p{queries_t.data(), b, padded, d, corpus.untyped_data(), bf16,
            mask.typed_data(), masked_score, static_cast<int>(k)};
  return SearchRows(
      n, b, padded, p.k, requested_threads,
      [&](int64_t begin, int64_t end, Lists& lists) { ScanRows(p, begin, end, lists); },
      scores->typed_data(), indices->typed_data());
}

ffi::Error TopKImpl(ffi::Buffer<ffi::F32> queries, ffi::AnyBuffer corpus,
                    ffi::Buffer<ffi::PRED> mask, float masked_score, int64_t threads,
                    ffi::Result<ffi::Buffer<ffi::F32>> scores,
                    ffi::Result<ffi::Buffer<ffi::S32>> indices) {
  return Guarded("phoenix_top_k", [&] {
    return TopK(queries, corpus, mask, masked_score, threads, scores, indices);
  });
}

// int8 rows, for the first pass of a two-pass search (search.TwoPassIndex): row r stands for
// codes[r] * scales[r], codes in [-127, 127]. Each query is rounded to steps of max|q| / levels,
// levels as large as int16 holds while a row's sum of d products stays within int32, so that a
// row's score is one exact integer dot product, scaled. The scores are approximate: the caller
// bounds their error. Rows are read once for all queries.
int32_t QueryLevels(int64_t d) {
  return static_cast<int32_t>(
      std::min<int64_t>(32767, std::numeric_limits<int32_t>::max() / (128 * std::max<int64_t>(1, d))));
}

struct Int8Problem {
  const int16_t* queries;    // [B, D], the rounded queries
  const float* query_steps;  // [B]
  int64_t num_queries, d;
  const int8_t* codes;  // [N, D]
  const float* scales;  // [N]
};

// One row at a time: each row's d products summed for each query, the row 16 ahead asked for
// meanwhile (8.4 -> 6.0 ms for 1,000,000 rows of 128 on two threads: the hardware prefetcher
// alone keeps too few reads in flight).
void ScanInt8RowsOneByOne(const Int8Problem& p, int64_t begin, int64_t end, Lists& lists) {
  for (int64_t row = begin; row < end; ++row) {
    const int8_t* x = p.codes + row * p.d;
    for (int64_t offset = 0; offset < p.d; offset += 64) {
      __builtin_prefetch(x + 16 * p.d + offset);
    }
    for (int64_t q = 0; q < p.num_queries; ++q) {
      const int16_t* y = p.queries + q * p.d;
      int32_t sum = 0;
      for (int64_t j = 0; j < p.d; ++j) sum += static_cast<int32_t>(x[j]) * y[j];
      float score = static_cast<float>(sum) * (p.query_steps[q] * p.scales[row]);
      RunningTopK& best = lists.best[q];
      if (!best.full() || !(score < best.threshold())) best.Push(score, static_cast<int32_t>(row));
    }
  }
}

#ifdef __AVX512BW__
// AVX-512: 16 rows at a time. Each row's products are summed in 16 lanes of int32 (32 int8
// codes widened to int16 against 32 elements of the query, in pairs), the 16 rows' lanes are
// then summed together into one vector of 16 row sums, and the 16 scores are computed and
// compared with the query's bar at once. The integer sums are exact and each score is the same
// float32 expression as one row at a time, so the result is the same bit for bit; the rows are
// asked for a block ahead, which keeps more reads in flight than the hardware prefetcher does.
constexpr int64_t kInt8Block = 16;

// [16 vectors of 16 lanes] -> one vector whose lane r is the sum of vector r's lanes.
inline __m512i SumLanesOf16(const __m512i (&v)[16]) {
  __m512i pairs[8], quads[4], octets[2];
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    quads[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * i], pairs[2 * i + 1]),
                                _mm512_unpackhi_epi64(pairs[2 * i], pairs[2 * i + 1]));
  }
  for (int i = 0; i < 2; ++i) {
    octets[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                                 _mm512_shuffle_i32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  }
  return _mm512_add_epi32(_mm512_shuffle_i32x4(octets[0], octets[1], 0x88),
                          _mm512_shuffle_i32x4(octets[0], octets[1], 0xdd));
}

inline __m512i MultiplyAdd(__m512i sum, __m512i x, __m512i y) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(sum, x, y);
#else
  return _mm512_add_epi32(sum, _mm512_madd_epi16(x, y));
#endif
}

void ScanInt8Rows(const Int8Problem& p, int64_t begin, int64_t end, Lists& lists) {
  const int64_t d = p.d;
  if (d % 32 != 0) return ScanInt8RowsOneByOne(p, begin, end, lists);
  int64_t row = begin;
  for (; row + kInt8Block <= end; row += kInt8Block) {
    const int8_t* block = p.codes + row * d;
    for (int64_t offset = 0; offset < kInt8Block * d; offset += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(block + kInt8Block * d + offset), _MM_HINT_T0);
    }
    const __m512 scales = _mm512_loadu_ps(p.scales + row);
    for (int64_t q = 0; q < p.num_queries; ++q) {
      const int16_t* y = p.queries + q * d;
      __m512i sums[kInt8Block];
      for (int r = 0; r < kInt8Block; ++r) {
        const int8_t* x = block + r * d;
        __m512i sum = _mm512_setzero_si512();
        for (int64_t j = 0; j < d; j += 32) {
          __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j));
          __m512i codes = _mm512_cvtepi8_epi16(packed);
          sum = MultiplyAdd(sum, codes, _mm512_loadu_si512(y + j));
        }
        sums[r] = sum;
      }
      __m512 scores = _mm512_mul_ps(_mm512_cvtepi32_ps(SumLanesOf16(sums)),
                                    _mm512_mul_ps(_mm512_set1_ps(p.query_steps[q]), scales));
      // At or above the bar (Push decides ties), or the bar is NaN (the list is still open).
      __mmask16 hits = _mm512_cmp_ps_mask(scores, _mm512_set1_ps(lists.bar[q]), _CMP_NLT_UQ);
      if (!hits) continue;
      alignas(64) float values[kInt8Block];
      _mm512_store_ps(values, scores);
      for (int r = 0; r < kInt8Block; ++r) {
        if (hits >> r & 1) lists.Push(q, values[r], static_cast<int32_t>(row + r));
      }
    }
  }
  ScanInt8RowsOneByOne(p, row, end, lists);
}
#else
void ScanInt8Rows(const Int8Problem& p, int64_t begin, int64_t end, Lists& lists) {
  ScanInt8RowsOneByOne(p, begin, end, lists);
}
#endif

ffi::Error TopKInt8(ffi::Buffer<ffi::F32> queries, ffi::Buffer<ffi::S8> codes,
                    ffi::Buffer<ffi::F32> scales, int64_t requested_threads,
                    ffi::Result<ffi::Buffer<ffi::F32>> scores,
                    ffi::Result<ffi::Buffer<ffi::S32>> indices) {
  Sizes sizes;
  ffi::Error error = CheckSizes("phoenix_top_k_int8", queries, codes, scales, *scores, sizes);
  if (error.failure()) return error;
  const auto [b, d, n, k] = sizes;
  const float levels = static_cast<float>(QueryLevels(d));
  std::vector<int16_t> rounded(b * d);
  std::vector<float> steps(b);
  for (int64_t q = 0; q < b; ++q) {
    const float* query = queries.typed_data() + q * d;
    float top = 0.0f;
    for (int64_t j = 0; j < d; ++j) top = std::max(top, std::fabs(query[j]));
    if (!std::isfinite(top)) {
      return ffi::Error::InvalidArgument("phoenix_top_k_int8: queries must be finite");
    }
    steps[q] = top / levels;
    for (int64_t j = 0; j < d; ++j) {
      rounded[q * d + j] = top > 0.0f ? static_cast<int16_t>(std::lrint(query[j] * (levels / top))) : 0;
    }
  }
  Int8Problem p{rounded.data(), steps.data(), b, d, codes.typed_data(), scales.typed_data()};
  return SearchRows(
      n, b, b, static_cast<int>(k), requested_threads,
      [&](int64_t begin, int64_t end, Lists& lists) { ScanInt8Rows(p, begin, end, lists); },
      scores->typed_data(), indices->typed_data());
}

ffi::Error TopKInt8Impl(ffi::Buffer<ffi::F32> queries, ffi::Buffer<ffi::S8> codes,
                        ffi::Buffer<ffi::F32> scales, int64_t threads,
                        ffi::Result<ffi::Buffer<ffi::F32>> scores,
                        ffi::Result<ffi::Buffer<ffi::S32>> indices) {
  return Guarded("phoenix_top_k_int8",
                 [&] { return TopKInt8(queries, codes, scales, threads, scores, indices); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PhoenixTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("masked_score")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PhoenixTopKInt8, TopKInt8Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Rows `rows` [n] of `row_bytes` bytes each, at `offset` + row * row_bytes in the file `fd`,
// into `out` [n, row_bytes], by positioned reads (the file is not mapped). Returns 0, an errno,
// or -1 if the file ends before a row does.
extern "C" __attribute__((visibility("default"))) int phoenix_read_rows(
    int fd, int64_t offset, int64_t row_bytes, const int64_t* rows, int64_t n, char* out) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t done = 0;
    while (done < row_bytes) {
      ssize_t got = pread(fd, out + i * row_bytes + done, row_bytes - done,
                          offset + rows[i] * row_bytes + done);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) return errno;
      if (got == 0) return -1;
      done += got;
    }
  }
  return 0;
}
