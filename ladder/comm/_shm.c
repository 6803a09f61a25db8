/* ladder.comm._shm: the hot paths of ladder/comm/shm.py's shared-memory collectives, on raw addresses.
 *
 * Ranks on one host exchange tensors through a segment they have all mapped (laid out by shm.py).
 * Every rank owns one control block and its own data slots and is the only one to write them, so
 * no locks and no read-modify-write atomics are needed: only two monotone counters per rank,
 *
 *   published  the last op whose data this rank has copied into its slot,
 *   consumed   the last op whose slots (its own and every peer's) this rank has finished reading.
 *
 * Memory ordering. A rank fills its slot with plain stores, then stores `published` with RELEASE
 * semantics; a reader loads `published` with ACQUIRE semantics before it reads the slot. A reader
 * whose acquire load sees the value is guaranteed to see every store the writer made before its
 * release store, on any architecture: on x86 both are plain moves (its memory model already orders
 * them, but the compiler must not move the stores past the release), on ARM they become stlr/ldar.
 * Relaxed loads/stores, or plain ones, would let an ARM reader see the new counter with stale data.
 * The same pairing on `consumed` protects the other direction (write-after-read): a reader's loads
 * from the slots happen before its release of `consumed`, so a writer that acquires consumed >= n
 * may overwrite the slot op n used without racing those loads.
 *
 * Python calls `send` (wait for back-pressure, copy in, publish) and `reduce` or `gather` (wait for
 * the peers, combine their slots, mark consumed): one C call per phase of an op. Failures come back
 * as (code, peer) and Python turns them into exceptions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* One control block per rank. 128 bytes, not 64: x86 prefetchers pull 64-byte lines in pairs, so
 * 64-byte neighbours could still bounce between the cores of two ranks spinning on each other. */
#define CONTROL_BYTES 128

struct control {
    uint64_t published; /* written by the owner (release), read by peers (acquire) */
    uint64_t consumed;  /* idem */
    uint64_t pid;       /* set once on attach, for the liveness check */
    uint64_t pid_ns;    /* pid namespace inode: a pid from another namespace is not checkable */
    uint64_t aborted;   /* nonzero once the owner gave up: peers fail fast instead of timing out */
};
_Static_assert(sizeof(struct control) <= CONTROL_BYTES, "control block overflows its lines");

enum { OK, TIMED_OUT, ABORTED, DIED, INTERRUPTED };
enum { SUM, MAX };
enum { FLOAT32, BFLOAT16, FLOAT16 };

/* Waiting: spin (a peer on time is microseconds away, and a system call costs more than that),
 * then sched_yield for YIELD_NS (ranks may outnumber cores: let the peer run), then sleep in naps
 * that double up to MAX_NAP_NS (a peer that is far behind must not cost a whole core). */
#define YIELD_NS 1000000LL
#define FIRST_NAP_NS 20000LL
#define MAX_NAP_NS 1000000LL

/* Who waits, and how patiently: the first five arguments of send/reduce/gather. */
struct waiter {
    char *controls; /* rank 0's control block; rank r's is CONTROL_BYTES * r further */
    uint64_t world, rank;
    int64_t timeout_ns, spin_ns;
};

static struct control *control(const struct waiter *w, uint64_t rank)
{
    return (struct control *)(w->controls + rank * CONTROL_BYTES);
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Tell the core we are spinning: frees pipeline resources for a sibling hyperthread and saves power. */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Only in the sleeping phase: kill() is a system call. A peer that has not attached yet (pid 0)
 * or lives in another pid namespace cannot be checked and counts as alive; so does an exited
 * but unreaped (zombie) peer, until its parent reaps it. */
static int alive(const struct control *me, const struct control *peer)
{
    uint64_t pid = __atomic_load_n(&peer->pid, __ATOMIC_ACQUIRE);
    if (pid == 0 || __atomic_load_n(&peer->pid_ns, __ATOMIC_RELAXED) != me->pid_ns)
        return 1;
    return kill((pid_t)pid, 0) == 0 || errno != ESRCH;
}

/* Wait until every peer's counter at offset `field` of its control block reaches `target`.
 * The GIL is released (into *released) only once the spin is over: a short wait never gives it up,
 * so it cannot end up queueing for it behind another Python thread (up to a 5 ms switch interval). */
static int wait_peers(const struct waiter *w, size_t field, uint64_t target, int *peer,
                      PyThreadState **released)
{
    const struct control *me = control(w, w->rank);
    int64_t start = 0;
    struct timespec nap = {0, FIRST_NAP_NS};
    for (uint64_t p = 0; p < w->world; p++) {
        const struct control *c = control(w, p);
        const uint64_t *counter = (const uint64_t *)((const char *)c + field);
        if (p == w->rank)
            continue;
        while (__atomic_load_n(counter, __ATOMIC_ACQUIRE) < target) {
            *peer = (int)p;
            if (__atomic_load_n(&c->aborted, __ATOMIC_RELAXED))
                return ABORTED;
            if (start == 0)
                start = now_ns();
            int64_t waited = now_ns() - start;
            if (waited < w->spin_ns) {
                cpu_relax();
                continue;
            }
            if (*released == NULL)
                *released = PyEval_SaveThread();
            if (waited >= w->timeout_ns)
                return TIMED_OUT;
            if (waited < w->spin_ns + YIELD_NS) {
                sched_yield();
                continue;
            }
            if (!alive(me, c))
                return DIED;
            nanosleep(&nap, NULL);
            nap.tv_nsec = nap.tv_nsec * 2 < MAX_NAP_NS ? nap.tv_nsec * 2 : MAX_NAP_NS;
            /* Let a Ctrl-C through now rather than at the timeout: signal handlers need the GIL.
             * Nothing was published or consumed yet, so the op is left as it was. */
            PyEval_RestoreThread(*released);
            int interrupted = PyErr_CheckSignals();
            *released = PyEval_SaveThread();
            if (interrupted)
                return INTERRUPTED;
        }
    }
    return OK;
}

/* --- conversions: bf16/fp16 are summed in float32 and rounded once, to nearest even ------------ */

static inline float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return from_bits((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f)
{
    uint32_t u = to_bits(f);
    if (f != f)
        return 0x7FC0; /* the quiet NaN torch produces */
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16); /* round half to even */
}

/* fp16 by bit manipulation and float arithmetic (Maratyszcza's FP16 library, which torch uses too):
 * portable, branch-free so it vectorizes, and unlike _Float16 it needs no libgcc call per element
 * on an x86-64 without F16C. Exact, denormals included; relies on the default rounding mode. */
static inline float f16_to_f32(uint16_t h)
{
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normal = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f; /* rebias the exponent */
    float denormal = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;       /* magic-number trick */
    return from_bits(sign | (two_w < (1u << 27) ? to_bits(denormal) : to_bits(normal)));
}

static inline uint16_t f32_to_f16(float f)
{
    /* Scaling by 2^112 then 2^-110 lets the FPU do the rounding (to nearest even) and the
     * overflow to infinity; adding `bias` aligns the mantissa so its top bits are the result. */
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w = to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    uint32_t bits = to_bits(from_bits((bias >> 1) + 0x07800000u) + base);
    uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* --- reduction ----------------------------------------------------------------------------------- */

/* Elements per pass: the float accumulator and one widened source (2 x 8 KiB) stay in L1. */
#define BLOCK 2048

static const size_t ITEMSIZE[] = {[FLOAT32] = 4, [BFLOAT16] = 2, [FLOAT16] = 2};

static void widen(int dtype, float *restrict out, const void *restrict src, size_t n)
{
    const uint16_t *h = src;
    if (dtype == FLOAT32)
        memcpy(out, src, n * 4);
    else if (dtype == BFLOAT16)
        for (size_t i = 0; i < n; i++) out[i] = bf16_to_f32(h[i]);
    else
        for (size_t i = 0; i < n; i++) out[i] = f16_to_f32(h[i]);
}

static void narrow(int dtype, void *restrict dst, const float *restrict acc, size_t n)
{
    uint16_t *h = dst;
    if (dtype == FLOAT32)
        memcpy(dst, acc, n * 4);
    else if (dtype == BFLOAT16)
        for (size_t i = 0; i < n; i++) h[i] = f32_to_bf16(acc[i]);
    else
        for (size_t i = 0; i < n; i++) h[i] = f32_to_f16(acc[i]);
}

static void accumulate(int op, float *restrict acc, const float *restrict x, size_t n)
{
    if (op == SUM)
        for (size_t i = 0; i < n; i++) acc[i] += x[i];
    else /* max, propagating NaN like torch.maximum */
        for (size_t i = 0; i < n; i++) acc[i] = (x[i] > acc[i] || x[i] != x[i]) ? x[i] : acc[i];
}

/* dst = src_0 (op) src_1 (op) ... (op) src_{nsrc-1}, elementwise and in exactly this order on every
 * rank, so every rank gets bitwise the same result. Source r starts at src + r * stride. */
static void reduce(int op, int dtype, char *dst, const char *src, size_t stride, size_t nsrc, size_t count)
{
    float acc[BLOCK], widened[BLOCK];
    size_t itemsize = ITEMSIZE[dtype];
    for (size_t first = 0; first < count; first += BLOCK) {
        size_t n = count - first < BLOCK ? count - first : BLOCK, offset = first * itemsize;
        widen(dtype, acc, src + offset, n);
        for (size_t r = 1; r < nsrc; r++) {
            const char *x = src + r * stride + offset;
            if (dtype != FLOAT32) {
                widen(dtype, widened, x, n);
                x = (const char *)widened;
            }
            accumulate(op, acc, (const float *)x, n);
        }
        narrow(dtype, dst + offset, acc, n);
    }
}

/* --- the Python functions ------------------------------------------------------------------------ */

/* Every argument is a non-negative int (addresses included). */
static int parse(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, uint64_t *out, const char *name)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, expected, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        out[i] = PyLong_AsUnsignedLongLong(args[i]);
        if (out[i] == (uint64_t)-1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static struct waiter waiter(const uint64_t *a)
{
    struct waiter w = {(char *)(uintptr_t)a[0], a[1], a[2], (int64_t)a[3], (int64_t)a[4]};
    return w;
}

/* None on success, else (code, peer rank), or the signal handler's exception. Restores the GIL if
 * wait_peers released it. */
static PyObject *outcome(int rc, int peer, PyThreadState *released)
{
    if (released)
        PyEval_RestoreThread(released);
    if (rc == OK)
        Py_RETURN_NONE;
    if (rc == INTERRUPTED)
        return NULL;
    return Py_BuildValue("(ii)", rc, peer);
}

/* Every collective step has one shape: wait until every peer's `wait_on` counter reaches the
 * step's target, do the step's copy or reduction, then store this rank's `mark` counter with release
 * ordering, so a peer that acquires the new count also sees everything the step wrote. */
struct step {
    const char *name;
    Py_ssize_t nargs;
    size_t wait_on, mark; /* offsetof(struct control, published or consumed) */
    uint64_t (*target)(const uint64_t *a);
    void (*act)(const uint64_t *a);
};

static PyObject *run_step(const struct step *step, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t a[16];
    if (parse(args, nargs, step->nargs, a, step->name))
        return NULL;
    struct waiter w = waiter(a);
    PyThreadState *released = NULL;
    int peer = -1;
    int rc = wait_peers(&w, step->wait_on, step->target(a), &peer, &released);
    if (rc == OK) {
        step->act(a);
        __atomic_store_n((uint64_t *)((char *)control(&w, w.rank) + step->mark), a[5], __ATOMIC_RELEASE);
    }
    return outcome(rc, peer, released);
}

static uint64_t this_op(const uint64_t *a) { return a[5]; }

#define WAITER_DOC "(controls, world, rank, timeout_ns, spin_ns, seq, "

/* send: every peer has consumed op seq - slots (the last user of this slot); copy, publish seq. */
static uint64_t slot_free(const uint64_t *a) { return a[5] > a[6] ? a[5] - a[6] : 0; }
static void copy_in(const uint64_t *a) { memcpy((void *)(uintptr_t)a[7], (const void *)(uintptr_t)a[8], a[9]); }

PyDoc_STRVAR(send_doc, "send" WAITER_DOC "slots, slot, src, nbytes) -> None | (code, peer)\n\n"
    "Wait until every peer has consumed op seq - slots (the last user of this slot), copy nbytes\n"
    "from src into this rank's slot, then publish seq.");

static PyObject *py_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static const struct step step = {"send", 10, offsetof(struct control, consumed),
                                      offsetof(struct control, published), slot_free, copy_in};
    (void)module;
    return run_step(&step, args, nargs);
}

static void reduce_slots(const uint64_t *a)
{
    reduce((int)a[6], (int)a[7], (char *)(uintptr_t)a[8], (const char *)(uintptr_t)a[9], a[10], a[11], a[12]);
}

PyDoc_STRVAR(reduce_doc, "reduce" WAITER_DOC "op, dtype, dst, src, stride, nsrc, count) -> None | (code, peer)\n\n"
    "Wait until every peer has published seq, reduce the nsrc slots at src, src + stride, ... (count\n"
    "elements each) into dst in rank order, then mark seq consumed.");

static PyObject *py_reduce(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static const struct step step = {"reduce", 13, offsetof(struct control, published),
                                      offsetof(struct control, consumed), this_op, reduce_slots};
    (void)module;
    if (nargs == 13) { /* checked before waiting: a bad op or dtype must not consume the step */
        unsigned long long op = PyLong_AsUnsignedLongLong(args[6]), dtype = PyLong_AsUnsignedLongLong(args[7]);
        if (PyErr_Occurred())
            return NULL;
        if (op > MAX || dtype > FLOAT16) {
            PyErr_Format(PyExc_ValueError, "reduce(): unknown op %llu or dtype %llu", op, dtype);
            return NULL;
        }
    }
    return run_step(&step, args, nargs);
}

static void gather_slots(const uint64_t *a)
{
    for (uint64_t r = 0; r < a[10]; r++)
        memcpy((char *)(uintptr_t)a[6] + r * a[7], (const char *)(uintptr_t)a[8] + r * a[9], a[11]);
}

PyDoc_STRVAR(gather_doc, "gather" WAITER_DOC "dst, dst_stride, src, src_stride, nsrc, nbytes) -> None | (code, peer)\n\n"
    "Wait until every peer has published seq, copy nbytes from each of the nsrc slots at src,\n"
    "src + src_stride, ... to dst, dst + dst_stride, ..., then mark seq consumed.");

static PyObject *py_gather(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static const struct step step = {"gather", 12, offsetof(struct control, published),
                                      offsetof(struct control, consumed), this_op, gather_slots};
    (void)module;
    return run_step(&step, args, nargs);
}

PyDoc_STRVAR(attach_doc, "attach(controls, rank, pid, pid_ns) -> int\n\n"
    "Claim the rank for this process (its pid serves the peers' liveness checks). Returns 0, or the\n"
    "pid already holding the rank, which is left as it was.");

static PyObject *py_attach(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t a[4];
    if (parse(args, nargs, 4, a, "attach"))
        return NULL;
    struct control *c = (struct control *)((char *)(uintptr_t)a[0] + a[1] * CONTROL_BYTES);
    uint64_t holder = 0;
    /* The namespace lands after the pid: a peer reading the pid before it sees a foreign namespace
     * and skips the liveness check, which is safe. */
    if (__atomic_compare_exchange_n(&c->pid, &holder, a[2], 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        __atomic_store_n(&c->pid_ns, a[3], __ATOMIC_RELEASE);
    (void)module;
    return PyLong_FromUnsignedLongLong(holder);
}

PyDoc_STRVAR(abort_doc, "abort(controls, rank) -> None\n\nRaise this rank's abort flag: peers waiting on it fail at once.");

static PyObject *py_abort(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t a[2];
    if (parse(args, nargs, 2, a, "abort"))
        return NULL;
    struct control *c = (struct control *)((char *)(uintptr_t)a[0] + a[1] * CONTROL_BYTES);
    __atomic_store_n(&c->aborted, 1, __ATOMIC_RELEASE);
    (void)module;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"send", (PyCFunction)(void (*)(void))py_send, METH_FASTCALL, send_doc},
    {"reduce", (PyCFunction)(void (*)(void))py_reduce, METH_FASTCALL, reduce_doc},
    {"gather", (PyCFunction)(void (*)(void))py_gather, METH_FASTCALL, gather_doc},
    {"attach", (PyCFunction)(void (*)(void))py_attach, METH_FASTCALL, attach_doc},
    {"abort", (PyCFunction)(void (*)(void))py_abort, METH_FASTCALL, abort_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ladder.comm._shm",
    .m_doc = "Spin-wait, copy and reduce primitives for ladder.comm.shm (raw addresses, no torch).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__shm(void)
{
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    const struct { const char *name; long value; } constants[] = {
        {"CONTROL_BYTES", CONTROL_BYTES}, {"TIMED_OUT", TIMED_OUT}, {"ABORTED", ABORTED}, {"DIED", DIED},
        {"SUM", SUM}, {"MAX", MAX}, {"FLOAT32", FLOAT32}, {"BFLOAT16", BFLOAT16}, {"FLOAT16", FLOAT16},
    };
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++) {
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
