/* One decode step of shared-prefix (cascade) attention, fused, for the CPU.
 *
 * Built and loaded by manyways/backends/cascade_kernel.py (cc -O3 -march=native, once per machine
 * and source; plain C, no torch headers). What it computes is cascade._decode_step's function:
 * for each row r (reading prompt p = prompt_of_row[r]) and key/value head h, the `group` query
 * heads of h attend, under one softmax, to the prompt's prefix keys/values (stored once per prompt)
 * and to the row's own suffix (its generated tokens). Scores, softmax and the weighted sums are
 * float32 from bf16 or float32 inputs; the output is rounded once to the inputs' dtype (bf16:
 * round to nearest even, as torch). Masked positions (mask byte 0) get weight exactly 0.
 *
 * Why: torch runs this step as ~25 small ops per layer (batched bf16 GEMMs of a few rows that copy
 * their strided inputs first, a masked fill, transposes, a concatenation, a softmax); at the
 * demo's decode batch that was 4-6 ms a layer on AMX against ~0.6 ms of KV reading. Here each row's
 * scores stay in a small float32 buffer and every input is read in place (strides, last one 1).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>


static inline float bf16_load(const uint16_t *p, int64_t i) {
    uint32_t u = ((uint32_t)p[i]) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float f32_load(const float *p, int64_t i) { return p[i]; }

static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0 (x - max of a softmax row), float32, within ~2 ulp (Cephes' expf
 * polynomial after range reduction); vectorisable (no calls, no branches). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* Vectors of 16 floats (GCC/clang vector extensions: AVX-512 registers where the machine has
 * them, pairs or quads of narrower ones elsewhere). */
typedef float vf16 __attribute__((vector_size(64)));
typedef uint16_t vu16 __attribute__((vector_size(32)));
typedef uint32_t vu32 __attribute__((vector_size(64)));
#define W 16
#define GROUP_MAX 16

static inline vf16 load16_bf16(const uint16_t *p) {
    vu16 h;
    memcpy(&h, p, sizeof h);
    vu32 u = __builtin_convertvector(h, vu32) << 16;
    vf16 f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline vf16 load16_f32(const float *p) {
    vf16 f;
    memcpy(&f, p, sizeof f);
    return f;
}

/* The first n (< 16) elements, zeros after them (a block's tail: no read past the data). */
static inline vf16 loadn_bf16(const uint16_t *p, int64_t n) {
    uint16_t tmp[W] = {0};
    memcpy(tmp, p, sizeof(uint16_t) * n);
    return load16_bf16(tmp);
}

static inline vf16 loadn_f32(const float *p, int64_t n) {
    float tmp[W] = {0};
    memcpy(tmp, p, sizeof(float) * n);
    return load16_f32(tmp);
}

/* How many 16-lane blocks one pass keeps in flight per query: G x NB accumulators in registers
 * (AVX-512 has 32), enough independent FMA chains to hide their latency. */
#define NBLOCKS(G) ((G) <= 4 ? 4 : ((G) <= 8 ? 2 : 1))

/* scores[j][i] = q[j] . keys[:, i] for the `len` key positions of K^T rows of stride `ld`:
 * NB x 16 positions a pass, the G x NB accumulators in registers (G is a constant in each
 * specialisation below), each key vector loaded once for all G queries; the last pass goes 16 at
 * a time, its tail reading whole vectors where they stay inside the storage (`end`). */
#define DEFINE_SCORES(NAME, T, LOAD16, LOADN)                                                      \
    static inline __attribute__((always_inline)) void NAME(                                        \
        const T *kt, int64_t ld, int64_t len, int64_t dim, const int64_t G, const float *q,        \
        float *scores, int64_t row_len, const char *end) {                                         \
        const int64_t NB = NBLOCKS(G);                                                             \
        int64_t i0 = 0;                                                                            \
        for (; i0 + W * NB <= len; i0 += W * NB) {                                                 \
            vf16 acc[GROUP_MAX][4];                                                                \
            for (int64_t j = 0; j < G; j++)                                                        \
                for (int64_t b = 0; b < NB; b++) acc[j][b] = (vf16){0};                            \
            for (int64_t d = 0; d < dim; d++) {                                                    \
                vf16 k[4];                                                                         \
                for (int64_t b = 0; b < NB; b++) k[b] = LOAD16(kt + d * ld + i0 + b * W);          \
                for (int64_t j = 0; j < G; j++) {                                                  \
                    const float qd = q[j * dim + d];                                               \
                    for (int64_t b = 0; b < NB; b++) acc[j][b] += qd * k[b];                       \
                }                                                                                  \
            }                                                                                      \
            for (int64_t j = 0; j < G; j++)                                                        \
                for (int64_t b = 0; b < NB; b++)                                                   \
                    memcpy(scores + j * row_len + i0 + b * W, &acc[j][b], sizeof acc[j][b]);       \
        }                                                                                          \
        for (; i0 < len; i0 += W) {                                                                \
            const int64_t n = len - i0 < W ? len - i0 : W;                                         \
            vf16 acc[GROUP_MAX];                                                                   \
            for (int64_t j = 0; j < G; j++) acc[j] = (vf16){0};                                    \
            for (int64_t d = 0; d < dim; d++) {                                                    \
                const T *at = kt + d * ld + i0; /* lanes past n are read but never stored */       \
                vf16 k = n == W || (const char *)(at + W) <= end ? LOAD16(at) : LOADN(at, n);      \
                for (int64_t j = 0; j < G; j++) acc[j] += q[j * dim + d] * k;                      \
            }                                                                                      \
            for (int64_t j = 0; j < G; j++) memcpy(scores + j * row_len + i0, &acc[j], sizeof(float) * n); \
        }                                                                                          \
    }

/* acc[j][:] += sum_i weights[j][i] * values[i][:] over `len` value rows of stride `ld`: NB x 16
 * dimensions a pass (then 16, then one at a time), each value vector loaded once for all G
 * weight rows. */
#define DEFINE_VALUES(NAME, T, LOAD16, LOAD)                                                       \
    static inline __attribute__((always_inline)) void NAME(                                        \
        const T *v, int64_t ld, int64_t len, int64_t dim, const int64_t G, const float *weights,   \
        int64_t row_len, float *out_acc) {                                                         \
        const int64_t NB = NBLOCKS(G);                                                             \
        int64_t d0 = 0;                                                                            \
        for (; d0 + W * NB <= dim; d0 += W * NB) {                                                 \
            vf16 acc[GROUP_MAX][4];                                                                \
            for (int64_t j = 0; j < G; j++)                                                        \
                for (int64_t b = 0; b < NB; b++)                                                   \
                    memcpy(&acc[j][b], out_acc + j * dim + d0 + b * W, sizeof acc[j][b]);          \
            for (int64_t i = 0; i < len; i++) {                                                    \
                vf16 x[4];                                                                         \
                for (int64_t b = 0; b < NB; b++) x[b] = LOAD16(v + i * ld + d0 + b * W);           \
                for (int64_t j = 0; j < G; j++) {                                                  \
                    const float w = weights[j * row_len + i];                                      \
                    for (int64_t b = 0; b < NB; b++) acc[j][b] += w * x[b];                        \
                }                                                                                  \
            }                                                                                      \
            for (int64_t j = 0; j < G; j++)                                                        \
                for (int64_t b = 0; b < NB; b++)                                                   \
                    memcpy(out_acc + j * dim + d0 + b * W, &acc[j][b], sizeof acc[j][b]);          \
        }                                                                                          \
        for (; d0 + W <= dim; d0 += W) {                                                           \
            vf16 acc[GROUP_MAX];                                                                   \
            for (int64_t j = 0; j < G; j++) memcpy(&acc[j], out_acc + j * dim + d0, sizeof acc[j]); \
            for (int64_t i = 0; i < len; i++) {                                                    \
                vf16 x = LOAD16(v + i * ld + d0);                                                  \
                for (int64_t j = 0; j < G; j++) acc[j] += weights[j * row_len + i] * x;            \
            }                                                                                      \
            for (int64_t j = 0; j < G; j++) memcpy(out_acc + j * dim + d0, &acc[j], sizeof acc[j]); \
        }                                                                                          \
        for (int64_t d = d0; d < dim; d++)                                                         \
            for (int64_t j = 0; j < G; j++) {                                                      \
                float a = out_acc[j * dim + d];                                                    \
                for (int64_t i = 0; i < len; i++) a += weights[j * row_len + i] * LOAD(v + i * ld, d); \
                out_acc[j * dim + d] = a;                                                          \
            }                                                                                      \
    }

DEFINE_SCORES(scores_bf16, uint16_t, load16_bf16, loadn_bf16)
DEFINE_SCORES(scores_f32, float, load16_f32, loadn_f32)
DEFINE_VALUES(values_bf16, uint16_t, load16_bf16, bf16_load)
DEFINE_VALUES(values_f32, float, load16_f32, f32_load)

/* One (row, head): scores over prefix and suffix, then the weighted values, for a group size G
 * that the callers below fix at compile time (so the accumulator loops unroll into registers). */
#define ROW_HEAD_ARGS                                                                              \
    int dtype, int64_t dim, const float *qf, const void *pk, int64_t pk2, int64_t P,               \
        const void *skt, int64_t sk2, int64_t S, float *scores, const uint8_t *pmask,              \
        const uint8_t *smask, const void *pv, int64_t pv2, const void *sv, int64_t sv2, float *acc, \
        float *sums, const char *pk_end, const char *sk_end
static void softmax_rows(float *scores, int64_t len, int64_t group, float *sums);

static inline __attribute__((always_inline)) void row_head(ROW_HEAD_ARGS, const int64_t G) {
    const int64_t len = P + S;
    if (dtype) {
        scores_bf16((const uint16_t *)pk, pk2, P, dim, G, qf, scores, len, pk_end);
        scores_bf16((const uint16_t *)skt, sk2, S, dim, G, qf, scores + P, len, sk_end);
    } else {
        scores_f32((const float *)pk, pk2, P, dim, G, qf, scores, len, pk_end);
        scores_f32((const float *)skt, sk2, S, dim, G, qf, scores + P, len, sk_end);
    }
    for (int64_t j = 0; j < G; j++) {
        float *s = scores + j * len;
        if (pmask)
            for (int64_t i = 0; i < P; i++)
                if (!pmask[i]) s[i] = -INFINITY;
        if (smask)
            for (int64_t i = 0; i < S; i++)
                if (!smask[i]) s[P + i] = -INFINITY;
    }
    softmax_rows(scores, len, G, sums);
    memset(acc, 0, sizeof(float) * G * dim);
    if (dtype) {
        values_bf16((const uint16_t *)pv, pv2, P, dim, G, scores, len, acc);
        values_bf16((const uint16_t *)sv, sv2, S, dim, G, scores + P, len, acc);
    } else {
        values_f32((const float *)pv, pv2, P, dim, G, scores, len, acc);
        values_f32((const float *)sv, sv2, S, dim, G, scores + P, len, acc);
    }
}

#define ROW_HEAD_FOR(G)                                                                            \
    static void row_head_##G(ROW_HEAD_ARGS) {                                                      \
        row_head(dtype, dim, qf, pk, pk2, P, skt, sk2, S, scores, pmask, smask, pv, pv2, sv, sv2,  \
                 acc, sums, pk_end, sk_end, G);                                                    \
    }
ROW_HEAD_FOR(1)
ROW_HEAD_FOR(2)
ROW_HEAD_FOR(3)
ROW_HEAD_FOR(4)
ROW_HEAD_FOR(5)
ROW_HEAD_FOR(6)
ROW_HEAD_FOR(7)
ROW_HEAD_FOR(8)
static void row_head_any(ROW_HEAD_ARGS, int64_t G) {
    row_head(dtype, dim, qf, pk, pk2, P, skt, sk2, S, scores, pmask, smask, pv, pv2, sv, sv2, acc,
             sums, pk_end, sk_end, G);
}
typedef void (*row_head_fn)(ROW_HEAD_ARGS);
static const row_head_fn ROW_HEAD[9] = {0,           row_head_1, row_head_2, row_head_3, row_head_4,
                                        row_head_5, row_head_6, row_head_7, row_head_8};

/* Softmax of each of the `group` score rows (length `len`, masked entries -inf) in place: the
 * rows become unnormalised weights exp(s - max); returns nothing, writes each row's sum. */
static void softmax_rows(float *scores, int64_t len, int64_t group, float *sums) {
    for (int64_t j = 0; j < group; j++) {
        float *s = scores + j * len;
        float lanes[W]; /* sixteen running maxima (a vertical loop that vectorises), then one */
        for (int64_t l = 0; l < W; l++) lanes[l] = -INFINITY;
        int64_t i0 = 0;
        for (; i0 + W <= len; i0 += W)
            for (int64_t l = 0; l < W; l++) lanes[l] = s[i0 + l] > lanes[l] ? s[i0 + l] : lanes[l];
        for (int64_t i = i0; i < len; i++) lanes[0] = s[i] > lanes[0] ? s[i] : lanes[0];
        float peak = -INFINITY;
        for (int64_t l = 0; l < W; l++) peak = lanes[l] > peak ? lanes[l] : peak;
        float total = 0.0f;
        for (int64_t i = 0; i < len; i++) {
            float w = s[i] == -INFINITY ? 0.0f : exp_nonpositive(s[i] - peak);
            s[i] = w;
            total += w;
        }
        sums[j] = total;
    }
}

/* dtype: 0 float32, 1 bfloat16 (q, keys, values and out all of it). Strides are in elements; the
 * last dimension of every tensor has stride 1. Shapes:
 *   q [rows, kv_heads, group, dim] contiguous; out the same;
 *   prompt_of_row [rows];
 *   prefix K^T [prompts, kv_heads, dim, P] (strides pk0, pk1, pk2), prefix V [prompts, kv_heads,
 *   P, dim] (pv0, pv1, pv2), prefix_mask [prompts, P] bytes or NULL (all visible);
 *   suffix K^T [rows, kv_heads, dim, S] (sk0, sk1, sk2), suffix V [rows, kv_heads, S, dim]
 *   (sv0, sv1, sv2), suffix_mask [rows, S] bytes (row stride sm0) or NULL;
 *   work: group * (P + S) + 2 * group * dim + group floats;
 *   prefix_kt_end, suffix_kt_end: the end of the memory readable from each K^T pointer (its
 *   storage's end): a block's tail reads whole vectors where they stay inside it.
 * Returns 0; 1 for an unknown dtype, 2 for a group outside 1..16. */
int manyways_cascade_decode(int dtype, int64_t rows, int64_t kv_heads, int64_t group, int64_t dim,
                            const void *q, const int64_t *prompt_of_row, const void *prefix_kt,
                            int64_t pk0, int64_t pk1, int64_t pk2, const void *prefix_v, int64_t pv0,
                            int64_t pv1, int64_t pv2, int64_t P, const uint8_t *prefix_mask,
                            const void *suffix_kt, int64_t sk0, int64_t sk1, int64_t sk2,
                            const void *suffix_v, int64_t sv0, int64_t sv1, int64_t sv2, int64_t S,
                            const uint8_t *suffix_mask, int64_t sm0, float scale, void *out,
                            float *work, const void *prefix_kt_end, const void *suffix_kt_end) {
    if (dtype != 0 && dtype != 1) return 1;
    if (group < 1 || group > GROUP_MAX) return 2;
    const int64_t len = P + S;
    float *scores = work;
    float *acc = work + group * len;
    float *sums = acc + group * dim;
    float *qf = sums + group;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t p = prompt_of_row[r];
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t qoff = (r * kv_heads + h) * group * dim;
            for (int64_t e = 0; e < group * dim; e++)
                qf[e] = (dtype ? bf16_load((const uint16_t *)q, qoff + e) : ((const float *)q)[qoff + e]) * scale;
            const int64_t pk = p * pk0 + h * pk1, pv = p * pv0 + h * pv1;
            const int64_t sk = r * sk0 + h * sk1, sv = r * sv0 + h * sv1;
            const size_t esize = dtype ? 2 : 4;
            const char *pkp = (const char *)prefix_kt + esize * pk, *pvp = (const char *)prefix_v + esize * pv;
            const char *skp = (const char *)suffix_kt + esize * sk, *svp = (const char *)suffix_v + esize * sv;
            const uint8_t *pm = prefix_mask ? prefix_mask + p * P : 0;
            const uint8_t *smk = suffix_mask ? suffix_mask + r * sm0 : 0;
            if (group <= 8)
                ROW_HEAD[group](dtype, dim, qf, pkp, pk2, P, skp, sk2, S, scores, pm, smk, pvp, pv2, svp,
                                sv2, acc, sums, (const char *)prefix_kt_end, (const char *)suffix_kt_end);
            else
                row_head_any(dtype, dim, qf, pkp, pk2, P, skp, sk2, S, scores, pm, smk, pvp, pv2, svp,
                             sv2, acc, sums, (const char *)prefix_kt_end, (const char *)suffix_kt_end, group);
            for (int64_t j = 0; j < group; j++) {
                const float inv = 1.0f / sums[j];
                for (int64_t d = 0; d < dim; d++) {
                    const float o = acc[j * dim + d] * inv;
                    if (dtype)
                        ((uint16_t *)out)[qoff + j * dim + d] = bf16_round(o);
                    else
                        ((float *)out)[qoff + j * dim + d] = o;
                }
            }
        }
    }
    return 0;
}
