/* One decoding step of mtnlg's GPT for a single row, fp32, on the CPU: see native/__init__.py.
 *
 * At batch 1 a token costs one pass over every weight; everything else is a few thousand numbers. From Python
 * each of those small ops costs 10-15 us, because streaming the weights evicts the caches between them; here
 * the whole step is one call and the small ops are plain loops that the compiler vectorizes. The arithmetic is
 * GPT.forward's for every architecture it builds: pre-norm blocks (LayerNorm or RMSNorm); learned positions or
 * rotary embeddings of q and k (pairs (i, i + rotary_dim / 2) of each head's first rotary_dim dimensions); fused
 * qkv whose rows are [group, (its q heads | k | v), head_dim] (one group per head: multi-head attention), softmax
 * attention scaled by 1/sqrt(head_dim) with one cached key/value head per group; a GeLU (tanh approximation) or
 * SwiGLU MLP; biases where the model has them; an output head tied to the embedding or of its own.
 *
 * Each weight matrix is fp32 or quantized (see `struct mtnlg_matrix`): int8 per output channel, or int4 in groups
 * along the inputs. A quantized product reads a quarter or an eighth of the bytes; its activations stay fp32
 * except inside the AVX-512 VNNI kernels, which round each block of 32 (int4) or 256 (int8) inputs to int16 with
 * its own scale (a relative error of at most 2^-16 of the block's largest value, below bf16's 2^-9 per value).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VNNI 1
#endif

/* e^x within 2 ulp for x in [-87, 88] (clamped outside), written so that loops over it vectorize (built with
 * -fno-trapping-math, which lets the clamps become vector min and max): libm's expf and tanhf do not vectorize. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    int32_t k = (int32_t)(x * 1.44269504088896341f + 128.5f) - 128; /* nearest; positive, so truncation floors */
    float n = (float)k;
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f; /* ln 2 in two parts: r exact */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    union { int32_t bits; float value; } scale = { .bits = (k + 127) << 23 }; /* 2^k */
    return p * scale.value;
}

/* GeLU, tanh approximation: 0.5 v (1 + tanh(u)) = v / (1 + e^(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3). */
static inline float gelu(float v) {
    float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return v / (1.0f + exp_approx(-2.0f * u));
}

/* silu(g) * u, SwiGLU's product of the gate and the up projection */
static inline float swiglu(float gate, float up) {
    return gate / (1.0f + exp_approx(-gate)) * up;
}

/* What a product does with its result: store it, add it to what is there, store its GeLU, or (SwiGLU's fused
 * gate and up matrix, see `swiglu_blocks`) store it and then silu(gate) * up of each pair after it in y + rows.
 * The activation is applied by the thread that computed the numbers, while they are in its cache: as a separate
 * pass the GeLU cost 11 us a layer. */
enum { STORE, ADD, STORE_GELU, STORE_SWIGLU };

/* SwiGLU's gate and up projections as one matrix of 2 f rows: blocks of 16 gate rows, each followed by the same
 * 16 up rows (the last block may be shorter). For the rows [start, end) of its product y (start a multiple of 32)
 * this stores silu(gate) * up of their pairs into out, f values. */
static void swiglu_blocks(const float *y, long rows, long start, long end, float *out) {
    long pairs = rows / 2;
    for (long r = start; r < end; r += 32) {
        long first = r / 2, size = pairs - first < 16 ? pairs - first : 16;
        const float *gate = y + r, *up = gate + size;
        #pragma omp simd
        for (long j = 0; j < size; j++) out[first + j] = swiglu(gate[j], up[j]);
    }
}

/* y = W x + b, stored in y or added to it. A wide or square W (rows <= cols) comes as stored, [rows, cols]: each
 * output is a dot product along a row. A tall one comes transposed, [cols, rows]: its rows are short, and the
 * per-row sums cost more than the reads, so each thread adds x[i] times row i into its part of y instead. */
static void product(const float *restrict W, const float *restrict x, const float *restrict b,
                    float *restrict y, long rows, long cols, int then) {
    if (rows > cols) {
        #pragma omp parallel
        {
            long align = then == STORE_SWIGLU ? 32 : 16; /* SwiGLU: each thread's part holds whole pairs of blocks */
            long threads = omp_get_num_threads(), chunk = ((rows + threads - 1) / threads + align - 1) / align * align;
            long start = omp_get_thread_num() * chunk, end = start + chunk < rows ? start + chunk : rows;
            for (long o = start; o < end; o++) y[o] = (then == ADD ? y[o] : 0.0f) + (b ? b[o] : 0.0f);
            long i = 0;
            for (; i + 4 <= cols; i += 4) { /* four rows of W per pass over this part of y */
                const float *w0 = W + i * rows, *w1 = w0 + rows, *w2 = w1 + rows, *w3 = w2 + rows;
                float x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
                #pragma omp simd
                for (long o = start; o < end; o++) y[o] += x0 * w0[o] + x1 * w1[o] + x2 * w2[o] + x3 * w3[o];
            }
            for (; i < cols; i++) {
                const float *w = W + i * rows;
                #pragma omp simd
                for (long o = start; o < end; o++) y[o] += x[i] * w[o];
            }
            if (then == STORE_GELU) {
                #pragma omp simd
                for (long o = start; o < end; o++) y[o] = gelu(y[o]);
            } else if (then == STORE_SWIGLU) {
                swiglu_blocks(y, rows, start, end, y + rows);
            }
        }
        return;
    }
    #pragma omp parallel for schedule(static)
    for (long r0 = 0; r0 < rows; r0 += 4) {
        long n = rows - r0 < 4 ? rows - r0 : 4;
        float sum[4] = {0, 0, 0, 0};
        if (n == 4) { /* four rows at a time: four independent sums while the rows stream in */
            const float *w0 = W + r0 * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            #pragma omp simd reduction(+:s0, s1, s2, s3)
            for (long i = 0; i < cols; i++) {
                s0 += w0[i] * x[i]; s1 += w1[i] * x[i]; s2 += w2[i] * x[i]; s3 += w3[i] * x[i];
            }
            sum[0] = s0; sum[1] = s1; sum[2] = s2; sum[3] = s3;
        } else {
            for (long k = 0; k < n; k++) {
                const float *w = W + (r0 + k) * cols;
                float s = 0;
                #pragma omp simd reduction(+:s)
                for (long i = 0; i < cols; i++) s += w[i] * x[i];
                sum[k] = s;
            }
        }
        for (long k = 0; k < n; k++) {
            float v = sum[k] + (b ? b[r0 + k] : 0.0f);
            y[r0 + k] = then == ADD ? y[r0 + k] + v : then == STORE_GELU ? gelu(v) : v;
        }
    }
    if (then == STORE_SWIGLU) swiglu_blocks(y, rows, 0, rows, y + rows);
}

/* ---- quantized weights ------------------------------------------------------------------------------------- */

/* Weight formats (quantize.py makes them):
 * FP32: `data` as `product` takes it (as stored when wide or square, transposed when tall).
 * INT8: `data` int8 [rows, cols]; `scales` float [rows]: w = q * scale of its row.
 * INT4: `data` [rows, cols / 2] bytes in blocks of 32 inputs, 16 bytes each: byte j holds input j in its low
 *       nibble and input j + 16 in its high one; `scales` and `mins` bf16 [rows, cols / group]: w = q * scale +
 *       min of its group (group: a multiple of 32 that divides cols). */
enum { FP32, INT8, INT4 };

struct mtnlg_matrix {
    long format, rows, cols, group;
    const void *data, *scales, *mins;
};

static inline float bf16(uint16_t bits) {
    union { uint32_t bits; float value; } v = { .bits = (uint32_t)bits << 16 };
    return v.value;
}

/* y = v, y + v or gelu(v), as `product` does (SwiGLU's pairs come after the product: `matrix_product`) */
static inline void finish(float *y, float v, int then) {
    *y = then == ADD ? *y + v : then == STORE_GELU ? gelu(v) : v;
}

#ifdef VNNI
/* x as int16 in blocks of `block` values, each with its scale: q = round(x / scale), scale = max |x| / 32767 */
static void to_int16(const float *x, long n, long block, int16_t *q, float *scales) {
    for (long b = 0; b * block < n; b++) {
        long start = b * block, end = start + block < n ? start + block : n;
        float largest = 0;
        for (long i = start; i < end; i++) largest = fmaxf(largest, fabsf(x[i]));
        float scale = largest > 0 ? largest / 32767.0f : 1.0f, inverse = 1.0f / scale;
        scales[b] = scale;
        for (long i = start; i < end; i++) q[i] = (int16_t)lrintf(x[i] * inverse);
    }
}

static inline float sum16(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

/* int8: y[r] = scale[r] * (q[r] . x) (+ b[r]). With VNNI: x in int16 blocks of 256 (256 products of int8 and
 * int16 fit an int32), four rows at a time; each block's integer sums turn into floats times its scale. */
static void int8_product(const struct mtnlg_matrix *m, const float *x, const float *b, float *y, int then) {
    long rows = m->rows, cols = m->cols;
    const int8_t *W = m->data;
    const float *scale = m->scales;
#ifdef VNNI
    enum { BLOCK = 256 };
    long blocks = cols / BLOCK, whole = blocks * BLOCK;
    int16_t *xq = aligned_alloc(64, (whole + 32) * sizeof(int16_t));
    float *xs = malloc((blocks + 1) * sizeof(float));
    to_int16(x, whole, BLOCK, xq, xs);
    #pragma omp parallel for schedule(static)
    for (long r0 = 0; r0 < rows; r0 += 4) {
        long n = rows - r0 < 4 ? rows - r0 : 4;
        const int8_t *w[4];
        for (long k = 0; k < 4; k++) w[k] = W + (r0 + (k < n ? k : 0)) * cols;
        __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
        for (long blk = 0; blk < blocks; blk++) {
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (long i = blk * BLOCK; i < (blk + 1) * BLOCK; i += 32) {
                __m512i xv = _mm512_load_si512(xq + i);
                a0 = _mm512_dpwssd_epi32(a0, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(w[0] + i))), xv);
                a1 = _mm512_dpwssd_epi32(a1, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(w[1] + i))), xv);
                a2 = _mm512_dpwssd_epi32(a2, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(w[2] + i))), xv);
                a3 = _mm512_dpwssd_epi32(a3, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(w[3] + i))), xv);
            }
            __m512 s = _mm512_set1_ps(xs[blk]);
            f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), s, f0);
            f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), s, f1);
            f2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2), s, f2);
            f3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a3), s, f3);
        }
        float sums[4] = {sum16(f0), sum16(f1), sum16(f2), sum16(f3)};
        for (long k = 0; k < n; k++) {
            float tail = 0;
            for (long i = whole; i < cols; i++) tail += w[k][i] * x[i];
            finish(y + r0 + k, (sums[k] + tail) * scale[r0 + k] + (b ? b[r0 + k] : 0.0f), then);
        }
    }
    free(xq);
    free(xs);
#else
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        const int8_t *w = W + r * cols;
        float s = 0;
        #pragma omp simd reduction(+:s)
        for (long i = 0; i < cols; i++) s += w[i] * x[i];
        finish(y + r, s * scale[r] + (b ? b[r] : 0.0f), then);
    }
#endif
}

/* int4: y[r] = sum over groups g of scale[r, g] * (q[r, g] . x[g]) + min[r, g] * sum(x[g]) (+ b[r]). With VNNI:
 * x in int16 blocks of 32, two blocks per step: the low nibbles of a block's 16 bytes are its first 16 inputs and
 * the high nibbles its last 16, so `xq` holds each pair of blocks as [A 0-15, B 0-15, A 16-31, B 16-31]; the
 * int32 lanes 0-7 of the dot products then belong to block A and 8-15 to block B. */
static void int4_product(const struct mtnlg_matrix *m, const float *x, const float *b, float *y, int then) {
    long rows = m->rows, cols = m->cols, group = m->group, groups = cols / group, blocks = cols / 32;
    const uint8_t *W = m->data;
    const uint16_t *scales = m->scales, *mins = m->mins;
    float *xsum = malloc(groups * sizeof(float));
    for (long g = 0; g < groups; g++) {
        float s = 0;
        for (long i = g * group; i < (g + 1) * group; i++) s += x[i];
        xsum[g] = s;
    }
#ifdef VNNI
    long pairs = blocks / 2;
    int16_t *xq = aligned_alloc(64, (64 * pairs + 64) * sizeof(int16_t)), *plain = malloc(cols * sizeof(int16_t));
    float *xs = malloc(blocks * sizeof(float));
    to_int16(x, cols, 32, plain, xs);
    for (long p = 0; p < pairs; p++)
        for (long j = 0; j < 16; j++) {
            xq[64 * p + j] = plain[64 * p + j];
            xq[64 * p + 16 + j] = plain[64 * p + 32 + j];
            xq[64 * p + 32 + j] = plain[64 * p + 16 + j];
            xq[64 * p + 48 + j] = plain[64 * p + 48 + j];
        }
    free(plain);
    long *group_of = malloc(blocks * sizeof(long)); /* each block's group: no division per row */
    for (long blk = 0; blk < blocks; blk++) group_of[blk] = blk * 32 / group;
    const __m512i nibble = _mm512_set1_epi16(15);
    __m512i lanes[8]; /* pair k of 8: lanes 0-7 from block 2k, 8-15 from block 2k + 1 */
    for (int k = 0; k < 8; k++)
        lanes[k] = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * k), _mm512_set1_epi32(2 * k + 1));
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        const uint8_t *w = W + r * cols / 2;
        const uint16_t *s = scales + r * groups, *mn = mins + r * groups;
        __m512 acc = _mm512_setzero_ps(), acc2 = acc;
        long p = 0;
        for (; p < pairs; p += 8) {
            long count = pairs - p < 8 ? pairs - p : 8;
            /* the scales of these (up to) 16 blocks times x's, one float per block, spread over 8 lanes below */
            __m512 bs;
            if (group == 32 && count == 8) { /* a block is a group: 16 scales at once, bf16 to fp32 by a shift */
                __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(s + 2 * p)));
                bs = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)), _mm512_loadu_ps(xs + 2 * p));
            } else {
                float block_scale[16] = {0};
                for (long k = 0; k < 2 * count; k++) block_scale[k] = bf16(s[group_of[2 * p + k]]) * xs[2 * p + k];
                bs = _mm512_loadu_ps(block_scale);
            }
            for (long k = 0; k < count; k++) {
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const void *)(w + 32 * (p + k))));
                __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(bytes, nibble),
                                                _mm512_load_si512(xq + 64 * (p + k)));
                d = _mm512_dpwssd_epi32(d, _mm512_srli_epi16(bytes, 4), _mm512_load_si512(xq + 64 * (p + k) + 32));
                __m512 scaled = _mm512_permutexvar_ps(lanes[k], bs);
                if (k & 1) acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scaled, acc2);
                else acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scaled, acc);
            }
        }
        p = pairs;
        float total = sum16(_mm512_add_ps(acc, acc2));
        for (long blk = 2 * p; blk < blocks; blk++) { /* the last blocks, from the fp32 inputs */
            const uint8_t *q = w + 16 * blk;
            float d = 0;
            for (long j = 0; j < 16; j++) d += (q[j] & 15) * x[32 * blk + j] + (q[j] >> 4) * x[32 * blk + 16 + j];
            total += bf16(s[group_of[blk]]) * d;
        }
        for (long g = 0; g < groups; g++) total += bf16(mn[g]) * xsum[g];
        finish(y + r, total + (b ? b[r] : 0.0f), then);
    }
    free(xq);
    free(xs);
    free(group_of);
#else
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        const uint8_t *w = W + r * cols / 2;
        const uint16_t *s = scales + r * groups, *mn = mins + r * groups;
        float total = 0;
        for (long blk = 0; blk < blocks; blk++) {
            const uint8_t *q = w + 16 * blk;
            const float *xb = x + 32 * blk;
            float d = 0;
            #pragma omp simd reduction(+:d)
            for (long j = 0; j < 16; j++) d += (q[j] & 15) * xb[j] + (q[j] >> 4) * xb[16 + j];
            total += bf16(s[blk * 32 / group]) * d;
        }
        for (long g = 0; g < groups; g++) total += bf16(mn[g]) * xsum[g];
        finish(y + r, total + (b ? b[r] : 0.0f), then);
    }
#endif
    free(xsum);
}

/* y = M x + b (stored, added, GeLU'd or SwiGLU'd, as `product` does) for a matrix of any format */
static void matrix_product(const struct mtnlg_matrix *m, const float *x, const float *b, float *y, int then) {
    if (m->format == FP32) {
        product(m->data, x, b, y, m->rows, m->cols, then);
        return;
    }
    int quantized_then = then == STORE_SWIGLU ? STORE : then;
    if (m->format == INT8) int8_product(m, x, b, y, quantized_then);
    else int4_product(m, x, b, y, quantized_then);
    if (then == STORE_SWIGLU) swiglu_blocks(y, m->rows, 0, m->rows, y + m->rows);
}

#ifdef VNNI
/* int8 for 2 to 8 rows of X at once: each weight row is read and widened once for all of them. */
static void int8_batch(const struct mtnlg_matrix *m, const float *x, const float *b, float *y, long count) {
    enum { BLOCK = 256 };
    long rows = m->rows, cols = m->cols, blocks = cols / BLOCK, whole = blocks * BLOCK;
    const int8_t *W = m->data;
    const float *scale = m->scales;
    int16_t *xq = aligned_alloc(64, 8 * (whole + 32) * sizeof(int16_t));
    float *xs = malloc(8 * (blocks + 1) * sizeof(float));
    for (long k = 0; k < count; k++) to_int16(x + k * cols, whole, BLOCK, xq + k * whole, xs + k * blocks);
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        const int8_t *w = W + r * cols;
        __m512 f[8];
        for (long k = 0; k < 8; k++) f[k] = _mm512_setzero_ps();
        for (long blk = 0; blk < blocks; blk++) {
            __m512i a[8];
            for (long k = 0; k < 8; k++) a[k] = _mm512_setzero_si512();
            for (long i = blk * BLOCK; i < (blk + 1) * BLOCK; i += 32) {
                __m512i wide = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(w + i)));
                for (long k = 0; k < count; k++)
                    a[k] = _mm512_dpwssd_epi32(a[k], wide, _mm512_load_si512(xq + k * whole + i));
            }
            for (long k = 0; k < count; k++)
                f[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[k]), _mm512_set1_ps(xs[k * blocks + blk]), f[k]);
        }
        for (long k = 0; k < count; k++) {
            float tail = 0;
            for (long i = whole; i < cols; i++) tail += w[i] * x[k * cols + i];
            y[k * rows + r] = (sum16(f[k]) + tail) * scale[r] + (b ? b[r] : 0.0f);
        }
    }
    free(xq);
    free(xs);
}
#endif

/* Y = X M^T + b for `count` rows of X [count, cols] (Y [count, rows]): the quantized layers' small batches. */
void mtnlg_quantized_product(const struct mtnlg_matrix *m, const float *x, const float *b, float *y, long count) {
#ifdef VNNI
    if (m->format == INT8) {
        for (long k = 0; k < count; k += 8) {
            long n = count - k < 8 ? count - k : 8;
            if (n == 1) int8_product(m, x + k * m->cols, b, y + k * m->rows, STORE);
            else int8_batch(m, x + k * m->cols, b, y + k * m->rows, n);
        }
        return;
    }
#endif
    for (long k = 0; k < count; k++) matrix_product(m, x + k * m->cols, b, y + k * m->rows, STORE);
}

/* The fp32 matrix [rows, cols] of a quantized one: for products over many rows (prompts), through torch. */
void mtnlg_dequantize(const struct mtnlg_matrix *m, float *out) {
    long rows = m->rows, cols = m->cols;
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        float *o = out + r * cols;
        if (m->format == INT8) {
            const int8_t *q = (const int8_t *)m->data + r * cols;
            float s = ((const float *)m->scales)[r];
            for (long i = 0; i < cols; i++) o[i] = q[i] * s;
        } else {
            long groups = cols / m->group;
            const uint8_t *q = (const uint8_t *)m->data + r * cols / 2;
            const uint16_t *s = (const uint16_t *)m->scales + r * groups, *mn = (const uint16_t *)m->mins + r * groups;
            for (long blk = 0; blk < cols / 32; blk++) {
                float scale = bf16(s[blk * 32 / m->group]), low = bf16(mn[blk * 32 / m->group]);
                for (long j = 0; j < 16; j++) {
                    o[32 * blk + j] = (q[16 * blk + j] & 15) * scale + low;
                    o[32 * blk + 16 + j] = (q[16 * blk + j] >> 4) * scale + low;
                }
            }
        }
    }
}

/* LayerNorm, or RMSNorm where there is no bias (x / sqrt(mean(x^2) + eps) * weight) */
static void norm(const float *x, const float *weight, const float *bias, float eps, float *out, long n) {
    if (!bias) {
        float squares = 0;
        for (long i = 0; i < n; i++) squares += x[i] * x[i];
        float scale = 1.0f / sqrtf(squares / n + eps);
        for (long i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
        return;
    }
    float mean = 0, var = 0;
    for (long i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (long i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float scale = 1.0f / sqrtf(var / n + eps);
    for (long i = 0; i < n; i++) out[i] = (x[i] - mean) * scale * weight[i] + bias[i];
}

/* Rotates the first `rotary` dimensions of each query and key head in qkv ([group, (its q heads | k | v),
 * head_dim]) in pairs (i, i + rotary / 2) by this position's angles (cos and sin: rotary / 2 each). */
static void rotate(float *qkv, long heads, long groups, long head_dim, long rotary, const float *cos,
                   const float *sin) {
    long per_group = heads / groups, half = rotary / 2;
    for (long g = 0; g < groups; g++)
        for (long j = 0; j <= per_group; j++) { /* the group's query heads, then its key */
            float *first = qkv + (g * (per_group + 2) + j) * head_dim, *second = first + half;
            #pragma omp simd
            for (long i = 0; i < half; i++) {
                float a = first[i], b = second[i];
                first[i] = a * cos[i] - b * sin[i];
                second[i] = b * cos[i] + a * sin[i];
            }
        }
}

/* Stores this position's key and value of every query group, then each head's query attends to positions
 * 0..position of its group's. qkv: [group, (its q heads | k | v), head_dim]; keys, values: one layer's [groups,
 * capacity, head_dim]; scores: [heads, capacity] of scratch. */
static void attention(const float *qkv, float *keys, float *values, float *scores, float *y,
                      long heads, long groups, long head_dim, long capacity, long position) {
    float scale = 1.0f / sqrtf((float)head_dim);
    long per_group = heads / groups, group_rows = (per_group + 2) * head_dim;
    for (long g = 0; g < groups; g++) {
        const float *group = qkv + g * group_rows;
        memcpy(keys + (g * capacity + position) * head_dim, group + per_group * head_dim, head_dim * sizeof(float));
        memcpy(values + (g * capacity + position) * head_dim, group + (per_group + 1) * head_dim,
               head_dim * sizeof(float));
    }
    #pragma omp parallel for schedule(static)
    for (long h = 0; h < heads; h++) {
        long g = h / per_group;
        const float *q = qkv + g * group_rows + (h - g * per_group) * head_dim;
        const float *k = keys + g * capacity * head_dim, *v = values + g * capacity * head_dim;
        float *s = scores + h * capacity, *out = y + h * head_dim;
        /* Four positions at a time: four independent sums per pass over q, one pass over out per four values.
         * The weights have evicted the cache since the last token, so the keys are fetched eight positions ahead
         * and these positions' values at once. Measured with the cache evicted, a layer's attention at 80
         * positions took 17 us, against 21-23 one position at a time and 23-26 four at a time without the
         * fetches; at 900 positions 125 us, against 125 and 140. */
        long t = 0;
        for (; t + 4 <= position + 1; t += 4) {
            const float *k0 = k + t * head_dim, *k1 = k0 + head_dim, *k2 = k1 + head_dim, *k3 = k2 + head_dim;
            for (long line = 0; line < 4 * head_dim; line += 16) { /* 16 floats: a 64-byte cache line */
                if (t + 12 <= position + 1) __builtin_prefetch(k0 + 8 * head_dim + line);
                __builtin_prefetch(v + t * head_dim + line);
            }
            float d0 = 0, d1 = 0, d2 = 0, d3 = 0;
            #pragma omp simd reduction(+:d0, d1, d2, d3)
            for (long i = 0; i < head_dim; i++) {
                d0 += q[i] * k0[i]; d1 += q[i] * k1[i]; d2 += q[i] * k2[i]; d3 += q[i] * k3[i];
            }
            s[t] = d0 * scale; s[t + 1] = d1 * scale; s[t + 2] = d2 * scale; s[t + 3] = d3 * scale;
        }
        for (; t <= position; t++) {
            const float *kt = k + t * head_dim;
            float dot = 0;
            #pragma omp simd reduction(+:dot)
            for (long i = 0; i < head_dim; i++) dot += q[i] * kt[i];
            s[t] = dot * scale;
        }
        float best = -INFINITY;
        #pragma omp simd reduction(max:best)
        for (t = 0; t <= position; t++) best = s[t] > best ? s[t] : best;
        float total = 0;
        #pragma omp simd reduction(+:total)
        for (t = 0; t <= position; t++) {
            s[t] = exp_approx(s[t] - best);
            total += s[t];
        }
        float inverse = 1.0f / total;
        for (long i = 0; i < head_dim; i++) out[i] = 0;
        for (t = 0; t + 4 <= position + 1; t += 4) {
            const float *v0 = v + t * head_dim, *v1 = v0 + head_dim, *v2 = v1 + head_dim, *v3 = v2 + head_dim;
            float p0 = s[t] * inverse, p1 = s[t + 1] * inverse, p2 = s[t + 2] * inverse, p3 = s[t + 3] * inverse;
            #pragma omp simd
            for (long i = 0; i < head_dim; i++) out[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i];
        }
        for (; t <= position; t++) {
            const float *vt = v + t * head_dim;
            float p = s[t] * inverse;
            #pragma omp simd
            for (long i = 0; i < head_dim; i++) out[i] += p * vt[i];
        }
    }
}

/* What stays the same from one token to the next of a generation.
 * weights: wte, wpe, ln_f.weight, ln_f.bias, the output head (wte's copy or lm_head), then per layer ln_1.weight,
 * ln_1.bias, qkv.weight, qkv.bias, proj.weight, proj.bias, ln_2.weight, ln_2.bias, fc.weight, fc.bias, mlp
 * proj.weight, mlp proj.bias; each matrix (the head included) a `struct mtnlg_matrix`, the rest float arrays.
 * What the model lacks is NULL: wpe with rotary positions, the norms' biases with RMSNorm, any linear bias. With
 * SwiGLU, fc is the gate and up projections in one matrix (see `swiglu_blocks`), fc.bias their biases likewise.
 * inverse_frequencies: rotary / 2 floats (rotary: the rotating dimensions of a head, 0 with learned positions).
 * keys, values: [layers, groups, capacity, head_dim]. work: 3 * hidden + (heads + 2 * groups) * head_dim + ffn
 * (3 * ffn with SwiGLU) + heads * capacity + rotary floats. logits: vocab floats. */
struct mtnlg_step {
    const void *const *weights;
    long layers, hidden, heads, groups, ffn, vocab, swiglu, rotary;
    float eps;
    const float *inverse_frequencies;
    float *keys, *values;
    long capacity;
    float *work, *logits;
};

/* Feeds `token` at `position` and leaves the next logits in s->logits. Returns the index of the first largest
 * logit, as torch's argmax (-1 if a logit is NaN or all are -inf): greedy decoding then needs no torch op per
 * token. */
long mtnlg_decode_step(const struct mtnlg_step *s, long token, long position) {
    const void *const *weights = s->weights;
    long layers = s->layers, hidden = s->hidden, heads = s->heads, groups = s->groups, ffn = s->ffn;
    long vocab = s->vocab, rotary = s->rotary, capacity = s->capacity;
    float eps = s->eps, *keys = s->keys, *values = s->values, *work = s->work, *logits = s->logits;
    const float *wte = weights[0], *wpe = weights[1], *ln_f_weight = weights[2], *ln_f_bias = weights[3];
    const struct mtnlg_matrix *head = weights[4];
    long head_dim = hidden / heads, layer_cache = groups * capacity * head_dim;
    float *x = work, *normed = x + hidden, *qkv = normed + hidden, *y = qkv + (heads + 2 * groups) * head_dim;
    float *mlp = y + hidden, *scores = mlp + (s->swiglu ? 3 * ffn : ffn), *cos = scores + heads * capacity;
    float *sin = cos + rotary / 2;
    const float *mlp_out = s->swiglu ? mlp + 2 * ffn : mlp; /* SwiGLU: after the gate and up products */
    for (long i = 0; i < hidden; i++) x[i] = wte[token * hidden + i] + (wpe ? wpe[position * hidden + i] : 0.0f);
    for (long i = 0; i < rotary / 2; i++) { /* in fp32, as the model computes its angles */
        float angle = (float)position * s->inverse_frequencies[i];
        cos[i] = cosf(angle);
        sin[i] = sinf(angle);
    }
    for (long l = 0; l < layers; l++) {
        const void *const *w = weights + 5 + 12 * l;
        norm(x, w[0], w[1], eps, normed, hidden);
        matrix_product(w[2], normed, w[3], qkv, STORE);
        if (rotary) rotate(qkv, heads, groups, head_dim, rotary, cos, sin);
        attention(qkv, keys + l * layer_cache, values + l * layer_cache, scores, y, heads, groups, head_dim,
                  capacity, position);
        matrix_product(w[4], y, w[5], x, ADD);
        norm(x, w[6], w[7], eps, normed, hidden);
        matrix_product(w[8], normed, w[9], mlp, s->swiglu ? STORE_SWIGLU : STORE_GELU);
        matrix_product(w[10], mlp_out, w[11], x, ADD);
    }
    norm(x, ln_f_weight, ln_f_bias, eps, normed, hidden);
    matrix_product(head, normed, 0, logits, STORE);
    long best = -1;
    float top = -INFINITY;
    for (long i = 0; i < vocab; i++) {
        if (isnan(logits[i])) return -1;
        if (logits[i] > top) {
            top = logits[i];
            best = i;
        }
    }
    return best;
}

/* One product y = W x (W as `product` takes it): what the benchmark's matrix-vector limit times. */
void mtnlg_matvec(const float *W, const float *x, float *y, long rows, long cols) {
    product(W, x, 0, y, rows, cols, STORE);
}

/* Reads `bytes` bytes (a multiple of 64, 64-byte aligned) once: what the benchmark's limit of a weight format times,
 * the time to read that format's weights. */
uint64_t mtnlg_read(const uint64_t *data, long bytes) {
    uint64_t total = 0;
    #pragma omp parallel for schedule(static) reduction(^:total)
    for (long i = 0; i < bytes / 8; i += 8) {
        uint64_t lane = 0;
        #pragma omp simd reduction(^:lane)
        for (long j = 0; j < 8; j++) lane ^= data[i + j];
        total ^= lane;
    }
    return total;
}
