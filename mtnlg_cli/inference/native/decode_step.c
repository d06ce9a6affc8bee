/* One decoding step of mtnlg's GPT for a single row, fp32, on the CPU: see native/__init__.py.
 *
 * At batch 1 a token costs one pass over every weight; everything else is a few thousand numbers. From Python
 * each of those small ops costs 10-15 us, because streaming the weights evicts the caches between them; here
 * the whole step is one call and the small ops are plain loops that the compiler vectorizes. The arithmetic is
 * GPT.forward's: pre-norm blocks, fused qkv whose rows are [head, q|k|v, head_dim], softmax attention scaled by
 * 1/sqrt(head_dim), GeLU (tanh approximation), output head tied to the embedding.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

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

/* What a product does with its result: store it, add it to what is there, or store its GeLU. The GeLU is applied
 * by the thread that computed the numbers, while they are in its cache: as a separate pass it cost 11 us a layer. */
enum { STORE, ADD, STORE_GELU };

/* y = W x + b, stored in y or added to it. A wide or square W (rows <= cols) comes as stored, [rows, cols]: each
 * output is a dot product along a row. A tall one comes transposed, [cols, rows]: its rows are short, and the
 * per-row sums cost more than the reads, so each thread adds x[i] times row i into its part of y instead. */
static void product(const float *restrict W, const float *restrict x, const float *restrict b,
                    float *restrict y, long rows, long cols, int then) {
    if (rows > cols) {
        #pragma omp parallel
        {
            long threads = omp_get_num_threads(), chunk = ((rows + threads - 1) / threads + 15) / 16 * 16;
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
}

static void layer_norm(const float *x, const float *weight, const float *bias, float eps, float *out, long n) {
    float mean = 0, var = 0;
    for (long i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (long i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float scale = 1.0f / sqrtf(var / n + eps);
    for (long i = 0; i < n; i++) out[i] = (x[i] - mean) * scale * weight[i] + bias[i];
}

/* Stores this position's key and value of every head, then each head's query attends to positions 0..position.
 * keys, values: one layer's [heads, capacity, head_dim]; scores: [heads, capacity] of scratch. */
static void attention(const float *qkv, float *keys, float *values, float *scores, float *y,
                      long heads, long head_dim, long capacity, long position) {
    float scale = 1.0f / sqrtf((float)head_dim);
    #pragma omp parallel for schedule(static)
    for (long h = 0; h < heads; h++) {
        const float *q = qkv + h * 3 * head_dim;
        float *k = keys + h * capacity * head_dim, *v = values + h * capacity * head_dim;
        float *s = scores + h * capacity, *out = y + h * head_dim;
        memcpy(k + position * head_dim, q + head_dim, head_dim * sizeof(float));
        memcpy(v + position * head_dim, q + 2 * head_dim, head_dim * sizeof(float));
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
 * weights: wte, wpe, ln_f.weight, ln_f.bias, the output head (wte again, as `product` takes it), then per layer
 * ln_1.weight, ln_1.bias, qkv.weight, qkv.bias, proj.weight, proj.bias, ln_2.weight, ln_2.bias, fc.weight, fc.bias,
 * mlp proj.weight, mlp proj.bias; each matrix as `product` takes it.
 * keys, values: [layers, heads, capacity, head_dim]. work: 6 * hidden + ffn + heads * capacity floats.
 * logits: vocab floats (the rows of wte). */
struct mtnlg_step {
    const float *const *weights;
    long layers, hidden, heads, ffn, vocab;
    float eps;
    float *keys, *values;
    long capacity;
    float *work, *logits;
};

/* Feeds `token` at `position` and leaves the next logits in s->logits. Returns the index of the first largest
 * logit, as torch's argmax (-1 if a logit is NaN or all are -inf): greedy decoding then needs no torch op per
 * token. */
long mtnlg_decode_step(const struct mtnlg_step *s, long token, long position) {
    const float *const *weights = s->weights;
    long layers = s->layers, hidden = s->hidden, heads = s->heads, ffn = s->ffn, vocab = s->vocab;
    long capacity = s->capacity;
    float eps = s->eps, *keys = s->keys, *values = s->values, *work = s->work, *logits = s->logits;
    const float *wte = weights[0], *wpe = weights[1], *ln_f_weight = weights[2], *ln_f_bias = weights[3];
    const float *head = weights[4];
    long head_dim = hidden / heads, layer_cache = heads * capacity * head_dim;
    float *x = work, *normed = x + hidden, *qkv = normed + hidden, *y = qkv + 3 * hidden, *mlp = y + hidden;
    float *scores = mlp + ffn;
    for (long i = 0; i < hidden; i++) x[i] = wte[token * hidden + i] + wpe[position * hidden + i];
    for (long l = 0; l < layers; l++) {
        const float *const *w = weights + 5 + 12 * l;
        layer_norm(x, w[0], w[1], eps, normed, hidden);
        product(w[2], normed, w[3], qkv, 3 * hidden, hidden, STORE);
        attention(qkv, keys + l * layer_cache, values + l * layer_cache, scores, y, heads, head_dim, capacity,
                  position);
        product(w[4], y, w[5], x, hidden, hidden, ADD);
        layer_norm(x, w[6], w[7], eps, normed, hidden);
        product(w[8], normed, w[9], mlp, ffn, hidden, STORE_GELU);
        product(w[10], mlp, w[11], x, hidden, ffn, ADD);
    }
    layer_norm(x, ln_f_weight, ln_f_bias, eps, normed, hidden);
    product(head, normed, 0, logits, vocab, hidden, STORE);
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
