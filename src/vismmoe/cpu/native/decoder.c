/* One whole decode step of a Qwen3-MoE-style decoder on the host's cores: vismmoe's native CPU decode step.
 *
 * For B rows, each one new token: the token's column of the attention mask on, its rope position (the row's attended
 * columns - 1 + its rope delta), rotary cos/sin = cos/sin(position * inv_freq) (both halves) * rope_scale, and its
 * embedding x [H]; then for every decoder layer:
 *   h = rmsnorm(x) -> q, k, v = h Wq^T, h Wk^T, h Wv^T (+ biases) -> per-head rmsnorm of q and k (when given)
 *   -> rotary (rotate-half, the row's cos/sin [D]) -> k, v written at column `pos` of the layer's KV cache
 *   -> per head: softmax(q k^T * scaling) v over the columns the row's mask attends (grouped-query: head h reads
 *      KV head h / (heads / kv_heads)) -> x += o Wo^T (+ bias)
 *   -> h = rmsnorm(x) -> a MoE layer: router logits h Wr^T [E], softmax, top-k, renormalised (norm_topk), the k
 *      experts read from their blobs at addr[moe, e] (a slot of the cache, or the host store: the caller's table)
 *      and summed in expert order; a dense layer: down(act(gate h) * up h) -> x += that
 * then logits = rmsnorm(x) lm_head^T [B, V] and ids = argmax (the first maximum).
 *
 * It is the same arithmetic as transformers' eager forward in float32 (tests/test_native_step.py compares them);
 * only summation orders differ. The matrices (float32, or bf16 where the caller found every value a bf16) are read
 * by the expert kernel's row tiles (experts.c, included below: one library).
 *
 * Threads: the whole step runs on one team: they share each matrix's output rows, each layer's (row, KV head) attention
 * pairs and the experts (experts.c's experts_team), and meet at this library's barriers in between (spinning up to
 * BARRIER_SPIN_NS, then asleep: a peer the machine's other work has descheduled gets its core back; the Python side
 * then asks for one thread: TeamSize). What every thread needs whole (the residual stream, its norms, the router and
 * its top-k and grouping) each thread computes itself, the same bits on every thread (step_layers says which buffers
 * are shared); the argmax is shared by rows. The team is one parallel region of the process's OpenMP runtime (built
 * with OpenMP, as the build first tries): torch's runtime, whose threads spin for a while after each of torch's
 * parallel regions (a prefill's last operator, the step's own books). A separate pool beside them made three or more
 * threads want two cores after every prefill: a step then waited milliseconds at a barrier for a descheduled peer (one
 * step in 25 on the 2-core machine, twice the decode's time a token). Built without OpenMP, the team is a pool of this
 * library's pthreads, which spin a little between steps (SPIN_NS), then sleep. OpenMP's own barrier is not used: its
 * threads fall asleep at each one when the process has more threads than cores, which costs more than a small model's
 * whole matrix.
 * Entry points return 0, or a negative number: -1 for arguments they refuse (nothing written), -2 for a step that
 * routed to an expert with no blob (vm_decode says what it wrote).
 */

#include "experts.c"

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>                 /* _mm_getcsr / _mm_setcsr: the floating-point mode */
#endif

typedef struct {
    const float *in_norm, *post_norm, *q_norm, *k_norm;     /* [H], [H], [D] or NULL, [D] or NULL */
    const void *wq, *wk, *wv, *wo;                          /* [nh*D, H], [nkv*D, H], [nkv*D, H], [H, nh*D] */
    const float *bq, *bk, *bv, *bo;                         /* biases or NULL */
    const void *router;                                     /* [E, H]: a MoE layer; NULL: a dense MLP */
    const void *w_gate, *w_up, *w_down;                     /* dense MLP: [I, H], [I, H], [H, I] */
    float *kc, *vc;                                         /* KV cache [Bb, nkv, Lc, D] */
    int32_t moe, inter;                                     /* MoE position (-1: dense); the dense MLP's I */
} vm_dec_layer;

typedef struct {
    int32_t layers, hidden, heads, kv_heads, head_dim, vocab, experts, top_k, norm_topk, act;
    int32_t wfmt;                                           /* the matrices' element type: VM_F32 or VM_BF16 */
    float eps, scaling, rope_scale;                         /* rope_scale: the rotary's attention scaling */
    const float *final_norm, *embed, *inv_freq;             /* [H], [V, H] float32, [D/2] */
    const void *lm_head;                                    /* [V, H] */
} vm_dec_model;

#define WORK_PER_THREAD (1 << 17)       /* multiply-adds of a step per thread of its team (fewer: fewer threads) */
#define MAX_THREADS 256                 /* < 1 << TEAM_BITS */
#define SPIN_NS 2000000L                /* how long an idle pool thread spins for the next step before it sleeps */
#define BARRIER_SPIN_NS 1000000L        /* how long a thread spins at a barrier before it sleeps (a whole step on
                                         * an idle machine takes about that: only a busy one puts threads to sleep) */

/* ---- the thread pool ----------------------------------------------------------------------------------------- */
typedef void (*team_fn)(vm_team *T, void *ctx);

#define TEAM_BITS 16                    /* `word` = (piece number << TEAM_BITS) | the piece's team size */

static struct {
    pthread_mutex_t call;               /* one piece of work at a time in the process */
    pthread_mutex_t m;                  /* with cv: a sleeping thread's wake-up */
    pthread_cond_t cv;
    atomic_long word;                   /* the current piece: its number and its team size, in one word, so a helper
                                         * decides whether it takes part from the value it saw, never from a later
                                         * piece's size */
    atomic_long done;                   /* helpers finished with the current piece */
    atomic_int bar_count;               /* the barrier: threads arrived */
    atomic_long bar_sense;              /* the barrier: its phase */
    atomic_int sleepers;                /* threads asleep (or about to be) in wait_for */
    int threads;                        /* threads started (helpers: tid 1..) */
    long born[MAX_THREADS];             /* `word` when each helper started: the first piece it waits for is the next */
    pid_t pid;                          /* the process the threads belong to (a forked child starts anew) */
    team_fn fn;                         /* the current piece (read only by its team, which the caller waits for) */
    void *ctx;
} pool = {.call = PTHREAD_MUTEX_INITIALIZER, .m = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

INLINE void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Wait until *flag != value (until_equal 0) or == value (1), and return what it then holds: spin for up to
 * `spin_ns`, then sleep on the pool's condition variable (whoever changes a flag does it in `publish`). Spinning
 * alone would take the core of a peer that the machine's other work has descheduled; sleeping at once costs a
 * wake-up (tens of microseconds on a VM) at every barrier. */
static long wait_for(atomic_long *flag, long value, int until_equal, long spin_ns) {
    long v;
    const long t0 = now_ns();
    for (int i = 1;; i++) {
        v = atomic_load(flag);
        if (until_equal ? v == value : v != value) return v;
        cpu_relax();
        if ((i & 255) == 0 && now_ns() - t0 > spin_ns) break;
    }
    pthread_mutex_lock(&pool.m);
    atomic_fetch_add(&pool.sleepers, 1);   /* before the look below: publish then sees it, or this sees the flag */
    for (;;) {
        v = atomic_load(flag);
        if (until_equal ? v == value : v != value) break;
        pthread_cond_wait(&pool.cv, &pool.m);
    }
    atomic_fetch_sub(&pool.sleepers, 1);
    pthread_mutex_unlock(&pool.m);
    return v;
}

/* *flag = value (or += value), waking whoever sleeps on a flag (the lock and broadcast only when one may) */
static void publish(atomic_long *flag, long value, int add) {
    if (add) atomic_fetch_add(flag, value);
    else atomic_store(flag, value);
    if (atomic_load(&pool.sleepers) > 0) {  /* a sleeper counted itself before its last look at the flag */
        pthread_mutex_lock(&pool.m);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.m);
    }
}

/* sense-reversing barrier over the piece's team: spin briefly, then sleep (wait_for) */
static void spin_barrier(vm_team *T) {
    T->sense = !T->sense;
    if (atomic_fetch_add(&pool.bar_count, 1) == T->nt - 1) {
        atomic_store(&pool.bar_count, 0);
        publish(&pool.bar_sense, T->sense, 0);
    } else {
        wait_for(&pool.bar_sense, T->sense, 1, BARRIER_SPIN_NS);
    }
}

/* fork: the child has none of the parent's threads, and a lock one of them held stays held there (both teams; an
 * OpenMP runtime's own threads are not fork-safe either: a child that uses torch's operators has the same limit) */
static void fork_prepare(void) { pthread_mutex_lock(&pool.call); }
static void fork_parent(void) { pthread_mutex_unlock(&pool.call); }
static void fork_child(void) {
    pthread_mutex_init(&pool.call, NULL);
    pthread_mutex_init(&pool.m, NULL);
    pthread_cond_init(&pool.cv, NULL);
    atomic_store(&pool.sleepers, 0);        /* the parent's sleeping helpers are not in the child */
    pool.threads = 1;
    pool.pid = getpid();
}
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void fork_handlers(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

#ifdef _OPENMP
/* fn(T, ctx) on a team of `nt` threads of the process's OpenMP runtime (the one torch runs on: its threads, still
 * spinning after torch's last parallel region, take the step at once instead of competing with a pool of this
 * library for the cores); the barriers inside are this library's (spin_barrier). The caller holds pool.call.
 * Returns 0. */
static int run_team(int nt, team_fn fn, void *ctx) {
    atomic_store(&pool.bar_count, 0);
    const long sense = atomic_load(&pool.bar_sense);
    if (nt <= 1) {
        vm_team T = {0, 1, spin_barrier, NULL, (int)sense};
        fn(&T, ctx);
    } else {
#pragma omp parallel num_threads(nt)
        {
            vm_team T = {omp_get_thread_num(), omp_get_num_threads(), spin_barrier, NULL, (int)sense};
            fn(&T, ctx);
        }
    }
    return 0;
}
#else
static void *helper(void *arg) {
    const int tid = (int)(intptr_t)arg;
    long seen = pool.born[tid];
    int idle = 0;                       /* the last piece did not need this thread: sleep at once */
    for (;;) {
        seen = wait_for(&pool.word, seen, 0, idle ? 0 : SPIN_NS);
        const int nt = (int)(seen & ((1L << TEAM_BITS) - 1));
        idle = tid >= nt;
        if (idle) continue;
        /* a member: the caller waits for this thread's `done`, so fn and ctx stay those of this piece */
        vm_team T = {tid, nt, spin_barrier, NULL, (int)atomic_load(&pool.bar_sense)};
        pool.fn(&T, pool.ctx);
        publish(&pool.done, 1, 1);
    }
    return NULL;
}


/* fn(T, ctx) on `nt` threads (this one is tid 0); returns when all are done. -1: no thread could be started (then
 * it ran on this thread alone). The caller holds pool.call. */
static int run_team(int nt, team_fn fn, void *ctx) {
    int rc = 0;
    if (pool.pid != getpid()) {         /* first use (a child forked while unused has no helpers either) */
        pool.threads = 1;
        pool.pid = getpid();
    }
    while (pool.threads < nt) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        pool.born[pool.threads] = atomic_load(&pool.word);
        const int ok = pthread_create(&th, &at, helper, (void *)(intptr_t)pool.threads) == 0;
        pthread_attr_destroy(&at);
        if (!ok) {
            nt = pool.threads;
            rc = nt == 1 ? -1 : 0;
            break;
        }
        pool.threads++;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.bar_count, 0);
    const long sense = atomic_load(&pool.bar_sense);
    if (nt > 1) publish(&pool.word, ((atomic_load(&pool.word) >> TEAM_BITS) + 1) << TEAM_BITS | nt, 0);
    vm_team T = {0, nt, spin_barrier, NULL, (int)sense};
    fn(&T, ctx);
    if (nt > 1) wait_for(&pool.done, nt - 1, 1, SPIN_NS);
    return rc;
}
#endif

/* ---- the step's pieces ----------------------------------------------------------------------------------------- */
/* sum of a[i] * b[i], VL lanes at a time (then the lanes, then the tail) */
static float dot(const float *a, const float *b, int n) {
    vf acc = {0};
    int i = 0;
    for (; i + VL <= n; i += VL) acc += ldv(a + i) * ldv(b + i);
    float d = hsum(acc);
    for (; i < n; i++) d += a[i] * b[i];
    return d;
}

/* y [n] = w * x * rsqrt(mean(x^2) + eps) (y may be x) */
static void rmsnorm(const float *x, const float *w, int n, float eps, float *y) {
    const float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* v [D] rotated in place: v * cos + rotate_half(v) * sin, rotate_half(v) = [-v[D/2:], v[:D/2]] */
static void rotate(float *v, const float *cos, const float *sin, int D) {
    const int h = D / 2;
    for (int i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cos[i] - b * sin[i];
        v[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* This thread's share of y [B, N] = x [B, K] W^T (+ bias), W [N, K] row-major in `fmt` (VM_F32 or VM_BF16): blocks
 * of RB output rows shared among the team, no barrier */
static void linear(vm_team *T, int fmt, const void *W, const float *bias, int N, int K, const float *x, int B,
                   float *y) {
    const vm_layout L = {fmt, K, 1, 0, 0, 0, 0, 0, 0, 0, 0};
    const int nb = (N + RB - 1) / RB;
    for (int64_t b = share_lo(T, nb); b < share_hi(T, nb); b++) {
        const int r0 = (int)b * RB, R = N - r0 < RB ? N - r0 : RB;
        rows(&L, (const uint8_t *)W, 0, r0, R, x, K, B, y, N, NULL);
        if (bias)
            for (int k = 0; k < B; k++)
                for (int r = r0; r < r0 + R; r++) y[(size_t)k * N + r] += bias[r];
    }
}

/* float32 scratch vm_decode needs for B rows, a KV length Lc, dense layers up to `inter` wide and experts
 * `ex_inter` wide */
int64_t vm_decode_scratch(const vm_dec_model *M, int B, int Lc, int inter, int ex_inter) {
    const int64_t H = M->hidden, Q = (int64_t)M->heads * M->head_dim, KV = (int64_t)M->kv_heads * M->head_dim;
    const int64_t P = (int64_t)B * M->top_k, I = inter > 0 ? inter : 1;
    return (int64_t)B * (2 * Q + 2 * KV + H + 2 * I + 2 * M->head_dim) + (int64_t)B * M->heads * Lc + P * H
           + vm_scratch((int)H, ex_inter > 0 ? ex_inter : 1, (int)P);
}

/* one step's arguments and shared state, for every thread of its team */
typedef struct {
    const vm_dec_model *M;
    const vm_dec_layer *Ls;
    const vm_layout *X;
    int B, Bb, Lc, max_inter;
    int64_t pos;
    const uint8_t *mask;
    const int64_t *deltas;
    const int64_t *addr;
    float *scratch;
    int64_t *route_idx, *ids, *ids_host;
    float *route_w, *route_h, *logits;
    int err;                            /* -2: a routed expert with no blob (every thread finds it: the same routing) */
    float *own;                         /* every thread's own floats: own_n from own + tid * own_n */
    size_t own_n;
    unsigned csr;                       /* the caller's floating-point mode (x86 MXCSR: flush-to-zero, denormals) */
} step_ctx;

/* One thread's own copy of what every thread computes alike (the residual stream, its norms, the routing), so the
 * team needs no barrier around them: the same inputs and code give every thread the same bits. */
typedef struct {
    float *x, *h, *rl, *xg, *wg;        /* [B, H] residual, [B, H] normed, [B, E] router logits, [P, H], [P] */
    int *row_of, *cnt, *fill, *taken;   /* [P], [E], [E], [E] */
    const uint8_t **blobs;              /* [P] */
    int64_t *off;                       /* [P + 1] */
    int n, err;
} own_state;

/* the team's own floats (every thread's own_state), grown as needed; used under pool.call only */
static float *own_buf;
static size_t own_cap;

/* a MoE layer's routing, by every thread into its own state `o` (the same bits on every thread): softmax over E in
 * float32, top-k (ties: the lower expert), renormalised; pairs grouped by expert into o->xg / o->wg, blobs and
 * offsets. `outputs` (one thread): also the step's route_idx, route_w and route_h for this layer. */
static void route(const step_ctx *c, const vm_dec_layer *Ly, own_state *o, int outputs) {
    const vm_dec_model *M = c->M;
    const int H = M->hidden, E = M->experts, K = M->top_k, B = c->B, p = Ly->moe;
    int *cnt = o->cnt, *fill = o->fill, *taken = o->taken;
    const float *h = o->h;
    int ri[B * K];
    float rw[B * K];
    for (int e = 0; e < E; e++) cnt[e] = 0;
    for (int b = 0; b < B; b++) {
        float *r = o->rl + (size_t)b * E, mx = -INFINITY, sum = 0.0f, top = 0.0f;
        for (int e = 0; e < E; e++) mx = r[e] > mx ? r[e] : mx;
        for (int e = 0; e < E; e++) { r[e] = expf(r[e] - mx); sum += r[e]; }
        for (int e = 0; e < E; e++) r[e] /= sum;
        for (int e = 0; e < E; e++) taken[e] = 0;
        for (int t = 0; t < K; t++) {       /* the largest not taken; the first such on ties (or NaNs) */
            int best = -1;
            for (int e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || r[e] > r[best])) best = e;
            taken[best] = 1;
            ri[b * K + t] = best;
            rw[b * K + t] = r[best];
            top += r[best];
        }
        if (M->norm_topk)
            for (int t = 0; t < K; t++) rw[b * K + t] /= top;
        for (int t = 0; t < K; t++) cnt[ri[b * K + t]]++;
    }
    if (outputs) {
        int64_t *oi = c->route_idx + (size_t)p * c->Bb * K;
        float *ow = c->route_w + (size_t)p * c->Bb * K;
        for (int j = 0; j < B * K; j++) {
            oi[j] = ri[j];
            ow[j] = rw[j];
        }
        for (int b = 0; b < B; b++)
            memcpy(c->route_h + ((size_t)p * c->Bb + b) * H, h + (size_t)b * H, sizeof(float) * H);
    }
    int acc = 0;
    for (int e = 0; e < E; e++) {
        fill[e] = acc;
        acc += cnt[e];
    }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < K; t++) {
            const int at = fill[ri[b * K + t]]++;
            o->row_of[at] = b;
            memcpy(o->xg + (size_t)at * H, h + (size_t)b * H, sizeof(float) * H);
            o->wg[at] = rw[b * K + t];
        }
    int n = 0;
    o->off[0] = 0;
    for (int e = 0; e < E; e++)
        if (cnt[e]) {
            o->blobs[n] = (const uint8_t *)(intptr_t)c->addr[(size_t)p * E + e];
            if (!o->blobs[n]) o->err = -2;
            o->off[++n] = fill[e];
        }
    o->n = o->err ? 0 : n;                   /* a missing blob: the team stops after this (step_body) */
}

/* one thread's part of the whole step. Shared (each value written by one thread): q, k, v, the attention output,
 * o, the dense MLP's gate/up, the scores, the experts' outputs, rotary, the expert kernel's scratch. Every thread's
 * own (own_state, the same bits on every thread): the residual stream, its norms, the router logits and the
 * routing, so the team meets only where it needs another thread's rows: after q/k/v, after attention, after o, and
 * at the expert kernel's barriers (dense layers: after gate/up, the activation, down). */
static void step_layers(vm_team *T, void *arg) {
    step_ctx *c = arg;
    const vm_dec_model *M = c->M;
    const int H = M->hidden, nh = M->heads, nkv = M->kv_heads, D = M->head_dim, E = M->experts, K = M->top_k;
    const int F = M->wfmt, B = c->B, Lc = c->Lc;
    const int Q = nh * D, KVW = nkv * D, grp = nh / nkv, P = B * (K > 0 ? K : 1);
    float *q = c->scratch, *k = q + (size_t)B * Q, *v = k + (size_t)B * KVW;
    float *att = v + (size_t)B * KVW, *o = att + (size_t)B * Q;
    float *mlp = o + (size_t)B * H;                      /* dense: [B, 2 * inter] */
    float *sc = mlp + (size_t)B * 2 * (c->max_inter > 0 ? c->max_inter : 1);     /* scores [B * nh, Lc] */
    float *yg = sc + (size_t)B * nh * Lc;                /* [P, H] */
    float *cs = yg + (size_t)P * H, *sn = cs + (size_t)B * D;                   /* [B, D], [B, D] */
    float *es = sn + (size_t)B * D;                      /* the expert kernel's own scratch */
    const int64_t pos = c->pos, L1 = pos + 1;            /* columns 0 .. pos may be attended */
    const vm_layout LK = {VM_F32, D, 1, 0, 0, 0, 0, 0, 0, 0, 0};     /* a KV head's keys as D-wide rows */
    vm_team solo = {0, 1, NULL, NULL, 0};                 /* linear() over every row, by this thread alone */
    int row_of[P], cnt[E], fill[E], taken[E];
    const uint8_t *blobs[P];
    int64_t off[P + 1];
    float *mine = c->own + (size_t)T->tid * c->own_n;
    own_state os = {mine, mine + (size_t)B * H, mine + (size_t)2 * B * H, mine + (size_t)2 * B * H + (size_t)B * E,
                    mine + (size_t)2 * B * H + (size_t)B * E + (size_t)P * H, row_of, cnt, fill, taken, blobs, off, 0,
                    0};
    float *ob = os.wg + P;                               /* [H]: one row's experts summed */
    float *x = os.x, *h = os.h;

    /* each row's rotary (its share) and embedding (every thread, into its own residual stream) */
    for (int64_t b = share_lo(T, B); b < share_hi(T, B); b++) {
        int64_t text = -1;
        for (int col = 0; col < Lc; col++) text += c->mask[(size_t)b * Lc + col] != 0;
        const float at = (float)(text + c->deltas[b]);
        for (int i = 0; i < D / 2; i++) {
            const float f = at * M->inv_freq[i];
            cs[b * D + i] = cs[b * D + i + D / 2] = cosf(f) * M->rope_scale;
            sn[b * D + i] = sn[b * D + i + D / 2] = sinf(f) * M->rope_scale;
        }
    }
    for (int b = 0; b < B; b++) memcpy(x + (size_t)b * H, M->embed + (size_t)c->ids[b] * H, sizeof(float) * H);

    for (int li = 0; li < M->layers; li++) {
        const vm_dec_layer *Ly = &c->Ls[li];
        for (int b = 0; b < B; b++) rmsnorm(x + (size_t)b * H, Ly->in_norm, H, M->eps, h + (size_t)b * H);
        linear(T, F, Ly->wq, Ly->bq, Q, H, h, B, q);
        linear(T, F, Ly->wk, Ly->bk, KVW, H, h, B, k);
        linear(T, F, Ly->wv, Ly->bv, KVW, H, h, B, v);
        T->barrier(T);                                   /* q, k, v and the rotary rows complete */
        /* per (row, KV head): q/k norms and rotary, the new column of the cache, then the group's heads' attention */
        for (int64_t bg = share_lo(T, B * nkv); bg < share_hi(T, B * nkv); bg++) {
            const int b = (int)bg / nkv, g = (int)bg % nkv;
            const float *cb = cs + (size_t)b * D, *sb = sn + (size_t)b * D;
            float *qg = q + (size_t)b * Q + (size_t)g * grp * D, *kh = k + (size_t)b * KVW + (size_t)g * D;
            for (int j = 0; j < grp; j++) {
                float *qh = qg + (size_t)j * D;
                if (Ly->q_norm) rmsnorm(qh, Ly->q_norm, D, M->eps, qh);
                rotate(qh, cb, sb, D);
            }
            if (Ly->k_norm) rmsnorm(kh, Ly->k_norm, D, M->eps, kh);
            rotate(kh, cb, sb, D);
            float *kb = Ly->kc + ((size_t)b * nkv + g) * Lc * D, *vb = Ly->vc + ((size_t)b * nkv + g) * Lc * D;
            memcpy(kb + (size_t)pos * D, kh, sizeof(float) * D);
            memcpy(vb + (size_t)pos * D, v + (size_t)b * KVW + (size_t)g * D, sizeof(float) * D);
            /* scores of the group's heads [grp, L1] (rows Lc apart), every column at once (row tiles over K) */
            float *s = sc + ((size_t)b * nh + (size_t)g * grp) * Lc;
            for (int64_t c0 = 0; c0 < L1; c0 += RB) {
                const int R = L1 - c0 < RB ? (int)(L1 - c0) : RB;
                rows(&LK, (const uint8_t *)kb, 0, (int)c0, R, qg, D, grp, s, Lc, NULL);
            }
            const uint8_t *mk = c->mask + (size_t)b * Lc;
            for (int j = 0; j < grp; j++) {
                float *sj = s + (size_t)j * Lc, mx = -INFINITY, sum = 0.0f;
                for (int64_t col = 0; col < L1; col++) {
                    sj[col] = mk[col] ? sj[col] * M->scaling : -INFINITY;
                    mx = sj[col] > mx ? sj[col] : mx;
                }
                vf acc[D / VL + 1];
                for (int i = 0; i <= D / VL; i++) acc[i] = (vf){0};
                float *out = att + (size_t)b * Q + ((size_t)g * grp + j) * D;
                for (int i = D / VL * VL; i < D; i++) out[i] = 0.0f;
                if (mx > -INFINITY)
                    for (int64_t col = 0; col < L1; col++) {
                        if (!mk[col]) continue;
                        const float pr = expf(sj[col] - mx);
                        const float *vc = vb + (size_t)col * D;
                        sum += pr;
                        for (int i = 0; i < D / VL; i++) acc[i] += pr * ldv(vc + i * VL);
                        for (int i = D / VL * VL; i < D; i++) out[i] += pr * vc[i];
                    }
                const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
                for (int i = 0; i < D / VL; i++) {
                    const vf r = acc[i] * inv;
                    memcpy(out + i * VL, &r, sizeof r);
                }
                for (int i = D / VL * VL; i < D; i++) out[i] *= inv;
            }
        }
        T->barrier(T);
        linear(T, F, Ly->wo, Ly->bo, H, Q, att, B, o);
        T->barrier(T);
        for (int b = 0; b < B; b++) {
            float *xb = x + (size_t)b * H;
            for (int i = 0; i < H; i++) xb[i] += o[(size_t)b * H + i];
            rmsnorm(xb, Ly->post_norm, H, M->eps, h + (size_t)b * H);
        }
        if (!Ly->router) {                               /* dense MLP */
            const int I = Ly->inter;
            float *gt = mlp, *up = mlp + (size_t)B * I;
            linear(T, F, Ly->w_gate, NULL, I, H, h, B, gt);
            linear(T, F, Ly->w_up, NULL, I, H, h, B, up);
            T->barrier(T);
            for (int64_t i = share_lo(T, (int64_t)B * I); i < share_hi(T, (int64_t)B * I); i++)
                gt[i] = (M->act == VM_SILU ? act_silu(gt[i]) : act_gelu_tanh(gt[i])) * up[i];
            T->barrier(T);
            linear(T, F, Ly->w_down, NULL, H, I, gt, B, o);
            T->barrier(T);
            for (int64_t i = 0; i < (int64_t)B * H; i++) x[i] += o[i];
            continue;
        }
        linear(&solo, F, Ly->router, NULL, E, H, h, B, os.rl);
        route(c, Ly, &os, T->tid == 0);
        if (os.err) {                        /* every thread finds it (the same routing): the team leaves together */
            if (T->tid == 0) c->err = os.err;
            return;
        }
        experts_team(T, c->X, os.n, os.blobs, os.off, os.xg, os.wg, M->act, es, yg);   /* ends with a barrier */
        /* each row: its pairs' outputs in expert order (as transformers sums them), then into the residual */
        for (int b = 0; b < B; b++) {
            for (int i = 0; i < H; i++) ob[i] = 0.0f;
            for (int at = 0; at < P; at++)
                if (row_of[at] == b)
                    for (int i = 0; i < H; i++) ob[i] += yg[(size_t)at * H + i];
            float *xb = x + (size_t)b * H;
            for (int i = 0; i < H; i++) xb[i] += ob[i];
        }
    }
    for (int b = 0; b < B; b++) rmsnorm(x + (size_t)b * H, M->final_norm, H, M->eps, h + (size_t)b * H);
    linear(T, F, M->lm_head, NULL, M->vocab, H, h, B, c->logits);
    T->barrier(T);
    for (int64_t b = share_lo(T, B); b < share_hi(T, B); b++) {
        const float *r = c->logits + (size_t)b * M->vocab;
        int best = 0;
        for (int t = 1; t < M->vocab; t++)
            if (r[t] > r[best]) best = t;
        c->ids[b] = best;
        if (c->ids_host) c->ids_host[b] = best;
    }
}

/* step_layers on this thread in the caller's floating-point mode: the mode is per thread (torch's
 * set_flush_denormal sets only the calling thread's), and threads that computed the routing with different modes
 * could route differently and leave the team apart at its barriers */
static void step_body(vm_team *T, void *arg) {
#if defined(__x86_64__) || defined(__i386__)
    const step_ctx *c = arg;
    const unsigned mine = _mm_getcsr();
    _mm_setcsr(c->csr);
    step_layers(T, arg);
    _mm_setcsr(mine);
#else
    step_layers(T, arg);
#endif
}

/* One decode step (module comment).
 *   M, Ls      the model and its layers (Ls[i].kc/vc: this bucket's caches)
 *   X          the experts' blob layout (NULL when no layer is a MoE layer)
 *   B, Bb, Lc  rows computed, the bucket's rows (the caches' and the outputs' row stride), the caches' length
 *   pos        [1]: the column the new tokens' keys and values go to; +1 after the step
 *   mask       [Bb, Lc] uint8: the columns each row attends; column *pos is set for every row
 *   deltas     [Bb] int64: each row's rope delta (rope position - text position)
 *   addr       [moe layers, E] int64: expert e of MoE position p is read at addr[p * E + e] (a blob of layout X;
 *              0 for an expert the step routes to: -2, the step stops at that layer: the layers before it have
 *              written their KV column at pos, which a re-run rewrites; mask column set; ids, logits, pos untouched)
 *   scratch    scratch_n >= vm_decode_scratch(...) float32
 *   route_idx  [moe layers, Bb * K] int64, route_w [.., Bb * K] float32, route_h [moe layers, Bb, H] float32:
 *              each MoE layer's top-k, weights and input, written for the B rows
 *   logits     [Bb, V] float32, written for the B rows
 *   ids        [Bb] int64: in, each row's new token; out, the next (the argmax), also into ids_host (or NULL)
 *   threads    threads at most (<= 0: 1); fewer for a small step (one per WORK_PER_THREAD multiply-adds) */
int vm_decode(const vm_dec_model *M, const vm_dec_layer *Ls, const vm_layout *X, int B, int Bb, int Lc, int64_t *pos,
              uint8_t *mask, const int64_t *deltas, const int64_t *addr, float *scratch, int64_t scratch_n,
              int64_t *route_idx, float *route_w, float *route_h, float *logits, int64_t *ids, int64_t *ids_host,
              int threads) {
    if (!M || !Ls || !mask || !pos || !deltas || !scratch || !logits || !ids || !M->embed || !M->inv_freq)
        return -1;
    const int H = M->hidden, nh = M->heads, nkv = M->kv_heads, D = M->head_dim, E = M->experts, K = M->top_k;
    if (H <= 0 || nh <= 0 || nkv <= 0 || nh % nkv || D <= 0 || D % 2 || B <= 0 || B > Bb || *pos < 0 || *pos >= Lc)
        return -1;
    for (int b = 0; b < B; b++)
        if (ids[b] < 0 || ids[b] >= M->vocab) return -1;
    if ((M->wfmt != VM_F32 && M->wfmt != VM_BF16) || M->layers <= 0 || M->vocab <= 0 || E <= 0) return -1;
    int max_inter = 0, moe_layers = 0;
    for (int i = 0; i < M->layers; i++) moe_layers += Ls[i].router != NULL;
    for (int i = 0; i < M->layers; i++) {
        if (Ls[i].router) {
            if (!X || !addr || !route_idx || !route_w || !route_h || X->hidden != H) return -1;
            if (Ls[i].moe < 0 || Ls[i].moe >= moe_layers || K <= 0 || K > E || X->inter <= 0) return -1;
            if (layout_args(X, M->act) != 0) return -1;     /* as vm_experts checks them */
        } else {
            if (Ls[i].inter <= 0 || !Ls[i].w_gate || !Ls[i].w_up || !Ls[i].w_down) return -1;
            if (Ls[i].inter > max_inter) max_inter = Ls[i].inter;
        }
    }
    if (scratch_n < vm_decode_scratch(M, B, Lc, max_inter, X ? X->inter : 0)) return -1;
    const int Q = nh * D, KVW = nkv * D, P = B * (K > 0 ? K : 1);
    int64_t work = (int64_t)M->vocab * H;
    for (int i = 0; i < M->layers; i++)
        work += (int64_t)H * (2 * Q + 2 * KVW) + (int64_t)nh * (*pos + 1) * D * 2 +
                (Ls[i].router ? (int64_t)E * H + (int64_t)K * 3 * H * X->inter : (int64_t)3 * H * Ls[i].inter);
    work *= B;
    int nt = work / WORK_PER_THREAD > threads ? threads : (int)(work / WORK_PER_THREAD);
    nt = nt < 1 ? 1 : nt > MAX_THREADS ? MAX_THREADS : nt;
    /* each thread's own: residual, its norm, router logits [B, E], grouped rows [P, H] and weights [P], one row's
     * sum [H]; whole cache lines apart */
    const size_t own_n = ((size_t)2 * B * H + (size_t)B * E + (size_t)P * H + P + H + 15) / 16 * 16;
    pthread_once(&fork_once, fork_handlers);
    pthread_mutex_lock(&pool.call);
    if (own_cap < own_n * nt) {
        free(own_buf);
        if (posix_memalign((void **)&own_buf, 64, own_n * nt * sizeof(float))) own_buf = NULL;
        own_cap = own_buf ? own_n * nt : 0;
    }
    if (!own_buf) {
        pthread_mutex_unlock(&pool.call);
        return -1;
    }
    for (int b = 0; b < Bb; b++) mask[(size_t)b * Lc + *pos] = 1;
    step_ctx c = {M, Ls, X, B, Bb, Lc, max_inter, *pos, mask, deltas, addr, scratch, route_idx, ids, ids_host, route_w,
                  route_h, logits, 0, own_buf, own_n, 0};
#if defined(__x86_64__) || defined(__i386__)
    c.csr = _mm_getcsr();
#endif
    run_team(nt, step_body, &c);
    pthread_mutex_unlock(&pool.call);
    if (c.err == 0) *pos += 1;
    return c.err;
}
