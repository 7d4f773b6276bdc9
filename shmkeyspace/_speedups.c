/*
 * shmkeyspace._speedups: the compiled read path and the writer's builder kernels
 * (optional; see reader.py and builder.py).
 *
 * Owns nothing of the format: it is a C copy of the query kernels of
 * snapshot.ImageView (lookup, range), of the hot path of Reader.get, and of
 * builder.py's kernels (scan_entries, build_table, find_slot, entry_mod,
 * lower_bound, keys_at), and of the writer's apply path (apply_events: the
 * event loop of keyspace.KeySpace.apply for the built-in decoders, with a
 * msgpack packer of decoded values; update_entries: builder._apply_one for runs
 * of updates; owned by apply.py), and must change together with those modules. The
 * pure-Python path stays the reference; both run the same tests
 * (tests/test_speedups.py, the property, torture, thread and fuzz suites are
 * parametrized over implementations; tests/test_state.py fuzzes the two
 * entry scans against each other).
 *
 * Types:
 *   Image  one validated image (built from a snapshot.ImageView by Image.of):
 *          holds a buffer export of the mapping (so the mapping cannot be
 *          unmapped under it: mmap.close() raises BufferError while an Image
 *          lives) and the offsets of its regions. lookup(key), range(lo, hi)
 *          (and lookup_raw, range_raw: the same entries as msgpack bytes, for
 *          Reader.typed) answer from it and know nothing of the seqlock, exactly
 *          like the Python kernels: the caller checks seq around them.
 *   ReaderBase  the base class of reader.Reader: its get() is Reader.get's hot
 *          path: seq load, the per-publication cache (a dict), the probe, the
 *          copy-out, a second seq load, the unpack. Anything unusual (new
 *          publication, retry, error, closed) calls self._get_slow(key).
 *          _get_decoded(vdec, edec, fail, key) is the same path for Reader.typed:
 *          the value's bytes go to a msgspec decoder (self._get_raw(key) otherwise).
 *
 * Safety rules (the same as the Python path's, see ImageView's doc):
 *   - never parse shared memory in place: an entry is copied into private
 *     memory first, every length is read once into a local and bounds-checked
 *     before use; the parser only ever sees the private copy;
 *   - every offset taken from the image is checked against the image bounds;
 *     a table probe is bounded by the table size;
 *   - everything a call touches is kept alive by a reference it holds for the
 *     whole call (another thread may close the Reader or install a new
 *     publication while this call allocates and the GC runs Python code).
 *
 * Memory ordering (the reader half of the seqlock in segment.py):
 *     s1 = load_acquire(seq); copy entry bytes; fence_acquire; s2 = load(seq)
 *   The acquire load keeps the copy after s1; the acquire fence keeps the copy
 *   (prior loads) before the s2 load. x86-64 (TSO): loads are not reordered
 *   with other loads, so both compile to plain MOVs and the builtins only stop
 *   the compiler from moving loads across them. aarch64: load-acquire is LDAR
 *   and the acquire fence is DMB ISHLD, which is what a weakly ordered reader
 *   needs; the writer (segment.Publisher._store_seq) issues full barriers
 *   around each seq store. Data bytes may be read torn; the seq check decides
 *   whether the private copy is used.
 *
 * Threads: methods run with the GIL held and never release it; free-threaded
 * builds re-enable the GIL when this module is imported (no Py_mod_gil slot).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if PY_VERSION_HEX < 0x03090000
#error "shmkeyspace._speedups needs Python >= 3.9"
#endif
#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *Py_NewRef(PyObject *o)
{
    Py_INCREF(o);
    return o;
}
#endif

static PyObject *EntryType = NULL;      /* reader.Entry (a tuple subclass) */
static PyObject *CorruptError = NULL;   /* errors.CorruptSegmentError */
static PyObject *Unpackb = NULL;        /* snapshot.unpackb, for types this decoder leaves to it */
static PyObject *Xxh3Long = NULL;       /* xxhash.xxh3_64_intdigest, for keys over 240 bytes */

/* ------------------------------------------------------------------------- */
/* xxh3_64 (seed 0) of inputs up to 240 bytes, as the reference xxHash 0.8    */
/* computes it (snapshot.key_hash); longer keys go to the xxhash module.      */
/* Checked against xxhash for every length 0..300 in tests/test_speedups.py.  */
/* XXH3 is Yann Collet's algorithm (xxHash, BSD 2-Clause); this is a small    */
/* re-implementation of its short-input paths and default secret, not a copy  */
/* of the library. Hashing in C instead of calling xxh3_64_intdigest saves a  */
/* Python call and a bytes object per cold get (~0.1 us of ~0.5 us).          */

#define P32_1 0x9E3779B1U
#define P32_2 0x85EBCA77U
#define P64_1 0x9E3779B185EBCA87ULL
#define P64_2 0xC2B2AE3D27D4EB4FULL
#define P64_3 0x165667B19E3779F9ULL
#define PMX_1 0x165667919E3779F9ULL
#define PMX_2 0x9FB21C651E98DF25ULL

static const uint8_t kSecret[136] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3,
};

static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; } /* LE host */
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t mul128_fold64(uint64_t a, uint64_t b)
{
    __uint128_t p = (__uint128_t)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
}

static inline uint64_t xxh64_avalanche(uint64_t h)
{
    h ^= h >> 33; h *= P64_2; h ^= h >> 29; h *= P64_3; h ^= h >> 32;
    return h;
}

static inline uint64_t xxh3_avalanche(uint64_t h)
{
    h ^= h >> 37; h *= PMX_1; h ^= h >> 32;
    return h;
}

static inline uint64_t rrmxmx(uint64_t h, uint64_t len)
{
    h ^= rotl64(h, 49) ^ rotl64(h, 24);
    h *= PMX_2;
    h ^= (h >> 35) + len;
    h *= PMX_2;
    return h ^ (h >> 28);
}

static inline uint64_t mix16(const uint8_t *in, const uint8_t *sec)
{
    return mul128_fold64(rd64(in) ^ rd64(sec), rd64(in + 8) ^ rd64(sec + 8));
}

static uint64_t xxh3_short(const uint8_t *in, size_t len)
{
    const uint8_t *s = kSecret;
    if (len <= 16) {
        if (len > 8) {
            uint64_t lo = rd64(in) ^ (rd64(s + 24) ^ rd64(s + 32));
            uint64_t hi = rd64(in + len - 8) ^ (rd64(s + 40) ^ rd64(s + 48));
            uint64_t acc = len + __builtin_bswap64(lo) + hi + mul128_fold64(lo, hi);
            return xxh3_avalanche(acc);
        }
        if (len >= 4) {
            uint64_t in1 = rd32(in), in2 = rd32(in + len - 4);
            uint64_t keyed = (in2 + (in1 << 32)) ^ (rd64(s + 8) ^ rd64(s + 16));
            return rrmxmx(keyed, len);
        }
        if (len) {
            uint32_t c = ((uint32_t)in[0] << 16) | ((uint32_t)in[len >> 1] << 24) | in[len - 1] |
                         ((uint32_t)len << 8);
            return xxh64_avalanche((uint64_t)c ^ (uint64_t)(rd32(s) ^ rd32(s + 4)));
        }
        return xxh64_avalanche(rd64(s + 56) ^ rd64(s + 64));
    }
    if (len <= 128) {
        uint64_t acc = len * P64_1;
        if (len > 32) {
            if (len > 64) {
                if (len > 96) {
                    acc += mix16(in + 48, s + 96);
                    acc += mix16(in + len - 64, s + 112);
                }
                acc += mix16(in + 32, s + 64);
                acc += mix16(in + len - 48, s + 80);
            }
            acc += mix16(in + 16, s + 32);
            acc += mix16(in + len - 32, s + 48);
        }
        acc += mix16(in, s);
        acc += mix16(in + len - 16, s + 16);
        return xxh3_avalanche(acc);
    }
    /* 129..240 */
    {
        uint64_t acc = len * P64_1, acc_end;
        unsigned rounds = (unsigned)(len / 16), i;
        for (i = 0; i < 8; i++)
            acc += mix16(in + 16 * i, s + 16 * i);
        acc_end = mix16(in + len - 16, s + 136 - 17);
        acc = xxh3_avalanche(acc);
        for (i = 8; i < rounds; i++)
            acc_end += mix16(in + 16 * i, s + 16 * (i - 8) + 3);
        return xxh3_avalanche(acc + acc_end);
    }
}

/* key_hash(): xxh3_64 or 1 (0 marks an empty slot). -1 with an exception set on error. */
static int key_hash(const uint8_t *k, Py_ssize_t n, uint64_t *out)
{
    uint64_t h;
    if (n <= 240) {
        h = xxh3_short(k, (size_t)n);
    } else {
        PyObject *b = PyBytes_FromStringAndSize((const char *)k, n), *r;
        if (b == NULL)
            return -1;
        r = PyObject_CallOneArg(Xxh3Long, b);
        Py_DECREF(b);
        if (r == NULL)
            return -1;
        h = PyLong_AsUnsignedLongLong(r);
        Py_DECREF(r);
        if (h == (uint64_t)-1 && PyErr_Occurred())
            return -1;
    }
    *out = h ? h : 1;
    return 0;
}

/* ------------------------------------------------------------------------- */
/* msgpack decoding of a private copy                                         */

#define MAX_DEPTH 200 /* deeper values go to the unpacker (C recursion stays bounded) */

typedef struct {
    const uint8_t *p, *end;
    int depth;
    int punt;  /* set (without an exception) for what this decoder leaves to Unpackb */
    int nogil; /* skip(): running without the GIL, so anything needing Python is deferred */
} Cur;

static PyObject *corrupt(const char *msg)
{
    PyErr_SetString(CorruptError, msg);
    return NULL;
}

static inline int need(Cur *c, size_t n)
{
    if ((size_t)(c->end - c->p) < n) {
        corrupt("msgpack value runs past its entry");
        return -1;
    }
    return 0;
}

static inline uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static PyObject *dec(Cur *c);

/* Map keys repeat across entries ("host", "port", ...): a direct-mapped cache of
   short key strings saves an allocation, a UTF-8 decode and, on dict insert, the
   string hash (a cached str keeps its hash). ormsgpack does the same; without it
   this decoder was no faster than ormsgpack on dict values. Filled and read with
   the GIL held, no Python code runs between its loads and stores. */
#define KC_SLOTS 512
#define KC_MAXLEN 32
static struct {
    PyObject *s;
    size_t len;
    uint8_t bytes[KC_MAXLEN];
} kcache[KC_SLOTS];

static PyObject *map_key(Cur *c, size_t n)
{
    PyObject *s;
    unsigned slot;
    if (n == 0 || n > KC_MAXLEN)
        return NULL; /* not cacheable: the caller decodes */
    slot = (unsigned)(xxh3_short(c->p, n) & (KC_SLOTS - 1));
    if (kcache[slot].s != NULL && kcache[slot].len == n && memcmp(kcache[slot].bytes, c->p, n) == 0) {
        c->p += n;
        return Py_NewRef(kcache[slot].s);
    }
    s = PyUnicode_DecodeUTF8((const char *)c->p, (Py_ssize_t)n, NULL);
    if (s == NULL)
        return NULL;
    c->p += n;
    Py_XSETREF(kcache[slot].s, Py_NewRef(s));
    kcache[slot].len = n;
    memcpy(kcache[slot].bytes, c->p - n, n);
    return s;
}

/* A map key: str from the cache when short, else any value (dec). */
static PyObject *dec_key(Cur *c)
{
    size_t n;
    uint8_t t;
    if (need(c, 1) < 0)
        return NULL;
    t = *c->p;
    if (t >= 0xa1 && t <= 0xbf) {
        n = t & 0x1f;
    } else if (t == 0xd9 && c->end - c->p >= 2) {
        n = c->p[1];
        if (n == 0 || n > KC_MAXLEN)
            return dec(c);
        if ((size_t)(c->end - c->p) < 2 + n)
            return dec(c); /* dec reports the truncation */
        c->p += 2;
        return map_key(c, n);
    } else {
        return dec(c);
    }
    if ((size_t)(c->end - c->p) < 1 + n)
        return dec(c);
    c->p += 1;
    return map_key(c, n);
}

static PyObject *dec_array(Cur *c, uint64_t n)
{
    PyObject *l;
    if (n > (uint64_t)(c->end - c->p)) /* every element takes at least one byte */
        return corrupt("msgpack array longer than its entry");
    l = PyList_New((Py_ssize_t)n);
    if (l == NULL)
        return NULL;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *v = dec(c);
        if (v == NULL) {
            Py_DECREF(l);
            return NULL;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, v);
    }
    return l;
}

static PyObject *dec_map(Cur *c, uint64_t n)
{
    PyObject *d;
    if (n > (uint64_t)(c->end - c->p) / 2)
        return corrupt("msgpack map longer than its entry");
#if PY_VERSION_HEX < 0x030D0000
    /* Presized: an 8-field map otherwise resizes once while filled (~10 % of its decode). */
    d = _PyDict_NewPresized((Py_ssize_t)n);
#else
    d = PyDict_New();
#endif
    if (d == NULL)
        return NULL;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *k = dec_key(c), *v;
        if (k == NULL) {
            Py_DECREF(d);
            return NULL;
        }
        if (!PyUnicode_CheckExact(k)) { /* the readers' unpacker decides about other keys */
            Py_DECREF(k);
            Py_DECREF(d);
            c->punt = 1;
            return NULL;
        }
        v = dec(c);
        if (v == NULL || PyDict_SetItem(d, k, v) < 0) {
            Py_DECREF(k);
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

static PyObject *dec_str(Cur *c, size_t n)
{
    PyObject *s;
    size_t i = 0;
    uint64_t hi = 0;
    if (need(c, n) < 0)
        return NULL;
    /* ASCII (most keys and values): one allocation and a memcpy, no decoder. */
    for (; i + 8 <= n; i += 8)
        hi |= rd64(c->p + i);
    for (; i < n; i++)
        hi |= c->p[i];
    if ((hi & 0x8080808080808080ULL) == 0 && n > 1) {
        s = PyUnicode_New((Py_ssize_t)n, 127);
        if (s != NULL)
            memcpy(PyUnicode_1BYTE_DATA(s), c->p, n);
    } else {
        s = PyUnicode_DecodeUTF8((const char *)c->p, (Py_ssize_t)n, NULL);
    }
    c->p += n;
    return s;
}

static PyObject *dec_bin(Cur *c, size_t n)
{
    PyObject *b;
    if (need(c, n) < 0)
        return NULL;
    b = PyBytes_FromStringAndSize((const char *)c->p, (Py_ssize_t)n);
    c->p += n;
    return b;
}

static PyObject *dec(Cur *c)
{
    uint8_t t;
    PyObject *r;
    if (need(c, 1) < 0)
        return NULL;
    t = *c->p++;
    if (t <= 0x7f)
        return PyLong_FromLong(t);
    if (t >= 0xe0)
        return PyLong_FromLong((int8_t)t);
    if (t >= 0xa0 && t <= 0xbf)
        return dec_str(c, t & 0x1f);
    if (t <= 0x9f) {
        if (++c->depth > MAX_DEPTH) {
            c->punt = 1;
            return NULL;
        }
        r = t >= 0x90 ? dec_array(c, t & 0x0f) : dec_map(c, t & 0x0f);
        c->depth--;
        return r;
    }
    switch (t) {
    case 0xc0: Py_RETURN_NONE;
    case 0xc2: Py_RETURN_FALSE;
    case 0xc3: Py_RETURN_TRUE;
    case 0xc4: case 0xc5: case 0xc6: {
        int w = t == 0xc4 ? 1 : t == 0xc5 ? 2 : 4;
        if (need(c, w) < 0)
            return NULL;
        c->p += w;
        return dec_bin(c, (size_t)be(c->p - w, w));
    }
    case 0xca: {
        uint32_t u;
        float f;
        if (need(c, 4) < 0)
            return NULL;
        u = (uint32_t)be(c->p, 4);
        c->p += 4;
        memcpy(&f, &u, 4);
        return PyFloat_FromDouble(f);
    }
    case 0xcb: {
        uint64_t u;
        double d;
        if (need(c, 8) < 0)
            return NULL;
        u = be(c->p, 8);
        c->p += 8;
        memcpy(&d, &u, 8);
        return PyFloat_FromDouble(d);
    }
    case 0xcc: case 0xcd: case 0xce: case 0xcf: {
        int w = 1 << (t - 0xcc);
        if (need(c, w) < 0)
            return NULL;
        c->p += w;
        return PyLong_FromUnsignedLongLong(be(c->p - w, w));
    }
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int w = 1 << (t - 0xd0);
        uint64_t u;
        int64_t v;
        if (need(c, w) < 0)
            return NULL;
        u = be(c->p, w);
        c->p += w;
        if (w < 8 && (u >> (8 * w - 1)) & 1)
            u |= ~(uint64_t)0 << (8 * w); /* sign-extend */
        memcpy(&v, &u, 8);
        return PyLong_FromLongLong(v);
    }
    case 0xd9: case 0xda: case 0xdb: {
        int w = t == 0xd9 ? 1 : t == 0xda ? 2 : 4;
        if (need(c, w) < 0)
            return NULL;
        c->p += w;
        return dec_str(c, (size_t)be(c->p - w, w));
    }
    case 0xdc: case 0xdd: case 0xde: case 0xdf: {
        int w = (t == 0xdc || t == 0xde) ? 2 : 4;
        uint64_t n;
        if (need(c, w) < 0)
            return NULL;
        n = be(c->p, w);
        c->p += w;
        if (++c->depth > MAX_DEPTH) {
            c->punt = 1;
            return NULL;
        }
        r = t <= 0xdd ? dec_array(c, n) : dec_map(c, n);
        c->depth--;
        return r;
    }
    default: /* ext types, 0xc1: the unpacker's business */
        c->punt = 1;
        return NULL;
    }
}

static int raw_key(const uint8_t *p, size_t n, const uint8_t **k, size_t *kn);

/* Entry from a list the unpacker returned (the rare types). */
static PyObject *entry_from_unpacker(const uint8_t *p, size_t n)
{
    PyObject *b, *lst, *e;
    b = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
    if (b == NULL)
        return NULL;
    lst = PyObject_CallOneArg(Unpackb, b);
    Py_DECREF(b);
    if (lst == NULL)
        return NULL;
    if (!PyList_CheckExact(lst) || PyList_GET_SIZE(lst) != 6) {
        Py_DECREF(lst);
        return corrupt("entry is not a 6-field array");
    }
    e = ((PyTypeObject *)EntryType)->tp_alloc((PyTypeObject *)EntryType, 6);
    if (e != NULL) {
        for (int i = 0; i < 6; i++) {
            PyObject *v = PyList_GET_ITEM(lst, i);
            Py_INCREF(v);
            PyTuple_SET_ITEM(e, i, v);
        }
    }
    Py_DECREF(lst);
    return e;
}

/* One Entry from the private copy [p, p+n): a 6-element array. ``same_key``:
   the query key whose raw bytes find_entry matched against this entry's key,
   reused instead of decoding an equal key (when it has the stored type), or NULL. */
static PyObject *decode_entry(const uint8_t *p, size_t n, PyObject *same_key)
{
    Cur c = {p, p + n, 0, 0};
    PyObject *e;
    int first = 0;
    if (n < 1 || p[0] != 0x96)
        return corrupt("entry is not a 6-field array");
    c.p++;
    e = ((PyTypeObject *)EntryType)->tp_alloc((PyTypeObject *)EntryType, 6);
    if (e == NULL)
        return NULL;
    if (same_key != NULL && n >= 2) {
        const uint8_t *k;
        size_t kn;
        uint8_t t = p[1];
        int is_str = (t >= 0xa0 && t <= 0xbf) || t == 0xd9 || t == 0xda || t == 0xdb;
        if (((is_str && PyUnicode_CheckExact(same_key)) || (!is_str && PyBytes_CheckExact(same_key))) &&
            raw_key(p, n, &k, &kn) == 0) {
            c.p = k + kn;
            PyTuple_SET_ITEM(e, 0, Py_NewRef(same_key));
            first = 1;
        }
    }
    for (int i = first; i < 6; i++) {
        PyObject *v = dec(&c);
        if (v == NULL) {
            Py_DECREF(e);
            if (c.punt && !PyErr_Occurred())
                return entry_from_unpacker(p, n);
            return NULL;
        }
        PyTuple_SET_ITEM(e, i, v);
    }
    return e;
}

/* The raw key of the entry at the private copy [p, p+n) (header parse only): 0 ok, -1 corrupt. */
static int raw_key(const uint8_t *p, size_t n, const uint8_t **k, size_t *kn)
{
    size_t start, len;
    uint8_t t;
    if (n < 2 || p[0] != 0x96)
        return -1;
    t = p[1];
    if (t >= 0xa0 && t <= 0xbf) {
        start = 2;
        len = t - 0xa0;
    } else if (t == 0xd9 || t == 0xc4) {
        if (n < 3)
            return -1;
        start = 3;
        len = p[2];
    } else if (t == 0xda || t == 0xc5) {
        if (n < 4)
            return -1;
        start = 4;
        len = (size_t)be(p + 2, 2);
    } else if (t == 0xdb || t == 0xc6) {
        if (n < 6)
            return -1;
        start = 6;
        len = (size_t)be(p + 2, 4);
    } else {
        return -1;
    }
    if (len > n - start)
        return -1;
    *k = p + start;
    *kn = len;
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Image                                                                      */

typedef struct {
    PyObject_HEAD
    Py_buffer buf;        /* export of the mapping (or of a private copy) */
    const uint8_t *arena; /* arena start */
    uint64_t arena_len;
    const uint8_t *table;
    uint64_t mask;
    const uint8_t *order;
    uint64_t count;
} Image;

static PyTypeObject ImageType;

static void Image_dealloc(Image *self)
{
    if (self->buf.obj != NULL)
        PyBuffer_Release(&self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int attr_u64(PyObject *o, const char *name, uint64_t *out)
{
    PyObject *v = PyObject_GetAttrString(o, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    return (*out == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

/* Image.of(view): the compiled kernels over a validated snapshot.ImageView. */
static PyObject *Image_of(PyObject *cls, PyObject *view)
{
    uint64_t arena_base, arena_len, table_off, slots, order_off, count;
    PyObject *src;
    Image *im;
    (void)cls;
    if (attr_u64(view, "arena_base", &arena_base) < 0 || attr_u64(view, "arena_len", &arena_len) < 0 ||
        attr_u64(view, "table_off", &table_off) < 0 || attr_u64(view, "slots", &slots) < 0 ||
        attr_u64(view, "order_off", &order_off) < 0 || attr_u64(view, "count", &count) < 0)
        return NULL;
    src = PyObject_GetAttrString(view, "src");
    if (src == NULL)
        return NULL;
    im = PyObject_New(Image, &ImageType);
    if (im == NULL) {
        Py_DECREF(src);
        return NULL;
    }
    im->buf.obj = NULL;
    if (PyObject_GetBuffer(src, &im->buf, PyBUF_SIMPLE) < 0) {
        Py_DECREF(src);
        Py_DECREF(im);
        return NULL;
    }
    Py_DECREF(src);
    {
        uint64_t blen = (uint64_t)im->buf.len;
        /* ImageView validated these; check again against this buffer (cheap). */
        if (slots < 8 || (slots & (slots - 1)) || slots > blen / 16 || count >= slots ||
            arena_base > blen || arena_len > blen - arena_base || table_off > blen - 16 * slots ||
            order_off > blen || count > (blen - order_off) / 8) {
            Py_DECREF(im);
            return corrupt("image regions lie outside their buffer");
        }
        im->arena = (const uint8_t *)im->buf.buf + arena_base;
        im->arena_len = arena_len;
        im->table = (const uint8_t *)im->buf.buf + table_off;
        im->mask = slots - 1;
        im->order = (const uint8_t *)im->buf.buf + order_off;
        im->count = count;
    }
    return (PyObject *)im;
}

/* The raw bytes of a query key; *tmp gets a reference to release if one was made. */
static int query_bytes(PyObject *key, const uint8_t **k, Py_ssize_t *n, PyObject **tmp)
{
    *tmp = NULL;
    if (PyUnicode_Check(key)) {
        const char *s = PyUnicode_AsUTF8AndSize(key, n);
        if (s == NULL)
            return -1;
        *k = (const uint8_t *)s;
        return 0;
    }
    if (PyBytes_Check(key)) {
        *k = (const uint8_t *)PyBytes_AS_STRING(key);
        *n = PyBytes_GET_SIZE(key);
        return 0;
    }
    if (PyByteArray_Check(key) || PyMemoryView_Check(key)) {
        *tmp = PyBytes_FromObject(key);
        if (*tmp == NULL)
            return -1;
        *k = (const uint8_t *)PyBytes_AS_STRING(*tmp);
        *n = PyBytes_GET_SIZE(*tmp);
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "key must be str or bytes, not %.100s", Py_TYPE(key)->tp_name);
    return -1;
}

typedef struct {
    uint8_t *p;
    size_t cap;
    uint8_t local[512];
} Scratch;

static inline void scratch_init(Scratch *s)
{
    s->p = s->local;
    s->cap = sizeof(s->local);
}

static inline int scratch_fit(Scratch *s, size_t n)
{
    if (n <= s->cap)
        return 0;
    if (s->p != s->local)
        PyMem_Free(s->p);
    s->p = PyMem_Malloc(n);
    if (s->p == NULL) {
        s->p = s->local;
        PyErr_NoMemory();
        return -1;
    }
    s->cap = n;
    return 0;
}

static inline void scratch_free(Scratch *s)
{
    if (s->p != s->local)
        PyMem_Free(s->p);
}

/* Find key in im; copy its entry into *s. 1 found (*len set), 0 absent, -1 error. */
static int find_entry(Image *im, const uint8_t *k, Py_ssize_t kn, Scratch *s, size_t *len)
{
    uint64_t h, i, probes = 0;
    if (key_hash(k, kn, &h) < 0)
        return -1;
    i = h & im->mask;
    for (;;) {
        uint64_t sh = rd64(im->table + 16 * i);
        if (sh == 0)
            return 0;
        if (sh == h) {
            uint64_t ol = rd64(im->table + 16 * i + 8);
            uint64_t off = ol & 0xFFFFFFFFu, n = ol >> 32;
            const uint8_t *ek;
            size_t ekn;
            if (off + n > im->arena_len) {
                corrupt("hash slot points outside the arena");
                return -1;
            }
            if (scratch_fit(s, n) < 0)
                return -1;
            memcpy(s->p, im->arena + off, n); /* the private copy every later step reads */
            if (raw_key(s->p, n, &ek, &ekn) < 0) {
                corrupt("entry is not a 6-field array with a str/bin key");
                return -1;
            }
            if (ekn == (size_t)kn && memcmp(ek, k, ekn) == 0) {
                *len = n;
                return 1;
            }
        }
        if (++probes > im->mask) {
            corrupt("hash table has no empty slot");
            return -1;
        }
        i = (i + 1) & im->mask;
    }
}

/* Image.lookup(key) -> Entry | None. O(1). */
static PyObject *Image_lookup(Image *self, PyObject *key)
{
    const uint8_t *k;
    Py_ssize_t kn;
    PyObject *tmp, *out = NULL;
    Scratch s;
    size_t n = 0;
    int found;
    if (query_bytes(key, &k, &kn, &tmp) < 0)
        return NULL;
    scratch_init(&s);
    found = find_entry(self, k, kn, &s, &n);
    if (found > 0)
        out = decode_entry(s.p, n, key);
    else if (found == 0)
        out = Py_NewRef(Py_None);
    scratch_free(&s);
    Py_XDECREF(tmp);
    return out;
}

/* Position of the first entry whose key is >= k: 0 ok, -1 error. O(log n). */
static int lower_bound(Image *im, const uint8_t *k, size_t kn, uint64_t *pos)
{
    uint64_t lo = 0, hi = im->count;
    uint8_t head[6];
    while (lo < hi) {
        uint64_t mid = (lo + hi) >> 1;
        uint64_t off = rd32(im->order + 8 * mid), n = rd32(im->order + 8 * mid + 4);
        size_t hn, ekn, m;
        const uint8_t *ek;
        int c;
        if (off + n > im->arena_len) {
            corrupt("entry lies outside the arena");
            return -1;
        }
        /* The entry's head is copied and parsed privately; the key bytes are
           then compared once, in place, with a length fixed by that copy and
           checked against the entry's bounds (nothing re-reads a length). */
        hn = n < sizeof(head) ? n : sizeof(head);
        memcpy(head, im->arena + off, hn);
        {
            uint8_t t = hn >= 2 && head[0] == 0x96 ? head[1] : 0;
            size_t start, len;
            if (t >= 0xa0 && t <= 0xbf) {
                start = 2;
                len = t - 0xa0;
            } else if ((t == 0xd9 || t == 0xc4) && hn >= 3) {
                start = 3;
                len = head[2];
            } else if ((t == 0xda || t == 0xc5) && hn >= 4) {
                start = 4;
                len = (size_t)be(head + 2, 2);
            } else if ((t == 0xdb || t == 0xc6) && hn >= 6) {
                start = 6;
                len = (size_t)be(head + 2, 4);
            } else {
                corrupt("entry is not a 6-field array with a str/bin key");
                return -1;
            }
            if (start > n || len > n - start) {
                corrupt("key runs past its entry");
                return -1;
            }
            ek = im->arena + off + start;
            ekn = len;
        }
        m = ekn < kn ? ekn : kn;
        c = memcmp(ek, k, m);
        if (c < 0 || (c == 0 && ekn < kn))
            lo = mid + 1;
        else
            hi = mid;
    }
    *pos = lo;
    return 0;
}

/* Image.range(lo, hi) -> [Entry]: lo <= key < hi (hi None: to the end). O(log n + k). */
static PyObject *Image_range(Image *self, PyObject *args)
{
    PyObject *lo, *hi, *out;
    uint64_t i, j, total = 0;
    Scratch s;
    size_t pos;
    if (!PyArg_ParseTuple(args, "SO:range", &lo, &hi))
        return NULL;
    if (hi != Py_None && !PyBytes_Check(hi)) {
        PyErr_SetString(PyExc_TypeError, "range bounds must be bytes");
        return NULL;
    }
    if (lower_bound(self, (const uint8_t *)PyBytes_AS_STRING(lo), (size_t)PyBytes_GET_SIZE(lo), &i) < 0)
        return NULL;
    if (hi == Py_None)
        j = self->count;
    else if (lower_bound(self, (const uint8_t *)PyBytes_AS_STRING(hi), (size_t)PyBytes_GET_SIZE(hi), &j) < 0)
        return NULL;
    if (j <= i)
        return PyList_New(0);
    for (uint64_t x = i; x < j; x++) {
        uint64_t off = rd32(self->order + 8 * x), n = rd32(self->order + 8 * x + 4);
        if (off + n > self->arena_len)
            return corrupt("range entry lies outside the arena");
        total += n;
    }
    if (total > self->arena_len)
        return corrupt("range is larger than the arena");
    scratch_init(&s);
    if (scratch_fit(&s, (size_t)total + 8 * (size_t)(j - i)) < 0)
        return NULL;
    /* One pass copies every entry (and its length as read) into private memory. */
    pos = 8 * (size_t)(j - i);
    for (uint64_t x = i; x < j; x++) {
        uint64_t off = rd32(self->order + 8 * x), n = rd32(self->order + 8 * x + 4);
        if (off + n > self->arena_len || pos + n > (size_t)total + 8 * (size_t)(j - i)) {
            scratch_free(&s);
            return corrupt("range entry moved while copied");
        }
        memcpy(s.p + 8 * (x - i), &n, 8); /* the length as copied */
        memcpy(s.p + pos, self->arena + off, n);
        pos += n;
    }
    out = PyList_New((Py_ssize_t)(j - i));
    if (out == NULL) {
        scratch_free(&s);
        return NULL;
    }
    pos = 8 * (size_t)(j - i);
    for (uint64_t x = i; x < j; x++) {
        uint64_t n;
        PyObject *e;
        memcpy(&n, s.p + 8 * (x - i), 8);
        e = decode_entry(s.p + pos, n, NULL);
        if (e == NULL) {
            Py_DECREF(out);
            scratch_free(&s);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)(x - i), e);
        pos += n;
    }
    scratch_free(&s);
    return out;
}

/* Image.lookup_raw(key) -> bytes | None: the entry's msgpack bytes (a private copy),
   for decoders of their own (Reader.typed). O(1). */
static PyObject *Image_lookup_raw(Image *self, PyObject *key)
{
    const uint8_t *k;
    Py_ssize_t kn;
    PyObject *tmp, *out = NULL;
    Scratch s;
    size_t n = 0;
    int found;
    if (query_bytes(key, &k, &kn, &tmp) < 0)
        return NULL;
    scratch_init(&s);
    found = find_entry(self, k, kn, &s, &n);
    if (found > 0)
        out = PyBytes_FromStringAndSize((const char *)s.p, (Py_ssize_t)n);
    else if (found == 0)
        out = Py_NewRef(Py_None);
    scratch_free(&s);
    Py_XDECREF(tmp);
    return out;
}

/* Image.range_raw(lo, hi) -> bytes: the entries lo <= key < hi as one msgpack array
   (array32 header, then the entries' bytes in key order: a private copy). O(log n + k). */
static PyObject *Image_range_raw(Image *self, PyObject *args)
{
    PyObject *lo, *hi, *out;
    uint64_t i, j, total = 0;
    size_t pos;
    uint8_t *p;
    if (!PyArg_ParseTuple(args, "SO:range_raw", &lo, &hi))
        return NULL;
    if (hi != Py_None && !PyBytes_Check(hi)) {
        PyErr_SetString(PyExc_TypeError, "range bounds must be bytes");
        return NULL;
    }
    if (lower_bound(self, (const uint8_t *)PyBytes_AS_STRING(lo), (size_t)PyBytes_GET_SIZE(lo), &i) < 0)
        return NULL;
    if (hi == Py_None)
        j = self->count;
    else if (lower_bound(self, (const uint8_t *)PyBytes_AS_STRING(hi), (size_t)PyBytes_GET_SIZE(hi), &j) < 0)
        return NULL;
    if (j < i)
        j = i;
    for (uint64_t x = i; x < j; x++) {
        uint64_t off = rd32(self->order + 8 * x), n = rd32(self->order + 8 * x + 4);
        if (off + n > self->arena_len)
            return corrupt("range entry lies outside the arena");
        total += n;
    }
    if (total > self->arena_len)
        return corrupt("range is larger than the arena");
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(5 + total));
    if (out == NULL)
        return NULL;
    p = (uint8_t *)PyBytes_AS_STRING(out);
    p[0] = 0xdd;
    p[1] = (uint8_t)((j - i) >> 24);
    p[2] = (uint8_t)((j - i) >> 16);
    p[3] = (uint8_t)((j - i) >> 8);
    p[4] = (uint8_t)(j - i);
    pos = 5;
    for (uint64_t x = i; x < j; x++) {
        /* Lengths are re-read: a torn one must not overrun the copy (the seqlock
           check then discards it). */
        uint64_t off = rd32(self->order + 8 * x), n = rd32(self->order + 8 * x + 4);
        if (off + n > self->arena_len || pos + n > 5 + (size_t)total) {
            Py_DECREF(out);
            return corrupt("range entry moved while copied");
        }
        memcpy(p + pos, self->arena + off, n);
        pos += n;
    }
    if (pos != 5 + (size_t)total) {
        Py_DECREF(out);
        return corrupt("range entry moved while copied");
    }
    return out;
}

static PyMethodDef Image_methods[] = {
    {"of", (PyCFunction)Image_of, METH_O | METH_CLASS, "Image.of(view): kernels over a snapshot.ImageView."},
    {"lookup", (PyCFunction)Image_lookup, METH_O, "lookup(key) -> Entry or None. O(1)."},
    {"range", (PyCFunction)Image_range, METH_VARARGS, "range(lo: bytes, hi: bytes | None) -> [Entry]."},
    {"lookup_raw", (PyCFunction)Image_lookup_raw, METH_O, "lookup_raw(key) -> the entry's bytes or None."},
    {"range_raw", (PyCFunction)Image_range_raw, METH_VARARGS, "range_raw(lo, hi) -> one msgpack array."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ImageType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkeyspace._speedups.Image",
    .tp_basicsize = sizeof(Image),
    .tp_dealloc = (destructor)Image_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Compiled query kernels over one validated snapshot image.",
    .tp_methods = Image_methods,
};

/* ------------------------------------------------------------------------- */
/* ReaderBase: Reader.get's hot path, as the base class of reader.Reader       */

typedef struct {
    PyObject_HEAD
    Py_buffer words;       /* export of the control block's words (kept until dealloc) */
    const uint64_t *seqp;  /* the seq word; NULL: not attached (pure-Python Reader) */
    Py_ssize_t cache_size;
    uint64_t seq;          /* seq of the installed publication (if image is set) */
    PyObject *image;       /* Image of that publication, or NULL */
    PyObject *cache;       /* its dict of answers, or NULL */
    int closed;            /* set by _core_close: installs are ignored from then on */
} Base;

static PyObject *str_get_slow, *str_py_get, *str_get_raw;

static void Base_dealloc(Base *self)
{
    Py_CLEAR(self->image);
    Py_CLEAR(self->cache);
    if (self->words.obj != NULL)
        PyBuffer_Release(&self->words);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Base_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Base *self = (Base *)type->tp_alloc(type, 0);
    (void)args;
    (void)kwds;
    return (PyObject *)self;
}

/* _core_attach(words, seq_index, cache_size): use the compiled get on these words. */
static PyObject *Base_attach(Base *self, PyObject *args)
{
    PyObject *words;
    Py_ssize_t idx, cache_size;
    Py_buffer nb, old;
    PyObject *old_i, *old_c;
    if (!PyArg_ParseTuple(args, "Onn:_core_attach", &words, &idx, &cache_size))
        return NULL;
    if (PyObject_GetBuffer(words, &nb, PyBUF_FULL_RO) < 0)
        return NULL;
    if (idx < 0 || (idx + 1) * 8 > nb.len || ((uintptr_t)nb.buf & 7)) {
        PyBuffer_Release(&nb);
        PyErr_SetString(PyExc_ValueError, "seq word index outside the control block");
        return NULL;
    }
    /* Attaching again (the Reader followed a re-created name): the installed
       publication belongs to the old block and goes. Nothing here releases the
       GIL, so no get() of another thread is between its loads of seqp; the
       Reader keeps the old block mapped until it closes. */
    old = self->words;
    old_i = self->image;
    old_c = self->cache;
    self->image = NULL;
    self->cache = NULL;
    self->words = nb;
    self->cache_size = cache_size;
    self->seqp = (const uint64_t *)self->words.buf + idx;
    Py_XDECREF(old_i);
    Py_XDECREF(old_c);
    if (old.obj != NULL)
        PyBuffer_Release(&old);
    Py_RETURN_NONE;
}

/* _core_install(seq, image, cache, words): the publication a reader thread just
   validated under the seq word of ``words``. Ignored when ``words`` is not the
   block attached now (another thread followed the name meanwhile). */
static PyObject *Base_install(Base *self, PyObject *args)
{
    unsigned long long seq;
    PyObject *image, *cache, *words, *old_i, *old_c;
    Py_buffer wb;
    int same;
    if (!PyArg_ParseTuple(args, "KO!O!O:_core_install", &seq, &ImageType, &image, &PyDict_Type, &cache,
                          &words))
        return NULL;
    if (self->closed) /* a thread that was refreshing while another closed */
        Py_RETURN_NONE;
    if (PyObject_GetBuffer(words, &wb, PyBUF_FULL_RO) < 0)
        return NULL;
    same = self->words.obj != NULL && wb.buf == self->words.buf;
    PyBuffer_Release(&wb);
    if (!same)
        Py_RETURN_NONE;
    old_i = self->image;
    old_c = self->cache;
    self->image = Py_NewRef(image);
    self->cache = Py_NewRef(cache);
    self->seq = seq;
    Py_XDECREF(old_i);
    Py_XDECREF(old_c);
    Py_RETURN_NONE;
}

/* _core_close(): forget the publication. The words export stays until dealloc:
   a get running in another thread may still load the seq word. */
static PyObject *Base_close(Base *self, PyObject *unused)
{
    PyObject *old_i = self->image, *old_c = self->cache;
    (void)unused;
    self->closed = 1;
    self->image = NULL;
    self->cache = NULL;
    Py_XDECREF(old_i);
    Py_XDECREF(old_c);
    Py_RETURN_NONE;
}

static inline PyObject *slow(Base *self, PyObject *key)
{
    return PyObject_CallMethodOneArg((PyObject *)self, str_get_slow, key);
}

/* get(key) -> Entry | None: Reader.get, compiled. */
static PyObject *Base_get(Base *self, PyObject *key)
{
    uint64_t s1;
    PyObject *image, *cache, *e, *tmp;
    const uint8_t *k;
    Py_ssize_t kn;
    Scratch s;
    size_t n = 0;
    int found;

    if (self->seqp == NULL) /* a Reader(implementation="python") */
        return PyObject_CallMethodOneArg((PyObject *)self, str_py_get, key);
    s1 = __atomic_load_n(self->seqp, __ATOMIC_ACQUIRE);
    if (self->image == NULL || s1 != self->seq)
        return slow(self, key);
    cache = self->cache;
    if (self->cache_size > 0) {
        e = PyDict_GetItemWithError(cache, key); /* borrowed */
        if (e != NULL)
            return Py_NewRef(e);
        if (PyErr_Occurred()) { /* unhashable: the slow path names the problem */
            PyErr_Clear();
            return slow(self, key);
        }
    }
    if (!PyUnicode_CheckExact(key) && !PyBytes_CheckExact(key))
        return slow(self, key);
    /* Hold what this call reads: another thread may install or close meanwhile. */
    image = Py_NewRef(self->image);
    Py_INCREF(cache);
    if (query_bytes(key, &k, &kn, &tmp) < 0)
        goto fail;
    scratch_init(&s);
    found = find_entry((Image *)image, k, kn, &s, &n);
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the copy above happens before the next load */
    if (found < 0 || __atomic_load_n(self->seqp, __ATOMIC_RELAXED) != s1) {
        /* moved, or garbage: the slow path retries or reports corruption */
        scratch_free(&s);
        if (found < 0 && !PyErr_ExceptionMatches(CorruptError) && !PyErr_ExceptionMatches(PyExc_ValueError))
            goto fail;
        PyErr_Clear();
        goto retry;
    }
    e = found ? decode_entry(s.p, n, key) : Py_NewRef(Py_None);
    scratch_free(&s);
    if (e == NULL) {
        if (!PyErr_ExceptionMatches(CorruptError) && !PyErr_ExceptionMatches(PyExc_ValueError))
            goto fail;
        PyErr_Clear();
        goto retry;
    }
    /* Absent keys are not cached: an answer of "absent" is one probe anyway, and a
       cached one would outlive memory that was wrong under an unchanged seq (the
       segment fuzz zeroes a table in place, then restores it: seed 1884526357). */
    if (self->cache_size > 0 && found) {
        if (PyDict_GET_SIZE(cache) >= self->cache_size)
            PyDict_Clear(cache);
        if (PyDict_SetItem(cache, key, e) < 0) {
            Py_DECREF(e);
            goto fail;
        }
    }
    Py_DECREF(image);
    Py_DECREF(cache);
    return e;
retry:
    Py_DECREF(image);
    Py_DECREF(cache);
    return slow(self, key);
fail:
    Py_DECREF(image);
    Py_DECREF(cache);
    return NULL;
}

static int skip(Cur *c, const char **why);

/* Call decode(arg); a ValueError it raises goes to fail(key, exc), which raises. */
static PyObject *call_decode(PyObject *decode, PyObject *fail, PyObject *key, PyObject *arg)
{
    PyObject *type, *value, *tb, *r, *out = PyObject_CallOneArg(decode, arg);
    if (out != NULL || !PyErr_ExceptionMatches(PyExc_ValueError))
        return out;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    r = PyObject_CallFunctionObjArgs(fail, key, value ? value : Py_None, NULL);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (r != NULL) { /* fail() must raise */
        Py_DECREF(r);
        PyErr_SetString(PyExc_SystemError, "_get_decoded: fail() returned");
    }
    return NULL;
}

/* The Entry of the entry at the private copy [p, p+n) with its value decoded by
   vdec(value bytes) (a msgspec Decoder of the value type): the key is the query key
   when it has the stored key's type (as decode_entry), the revisions come from this
   file's decoder. msgspec decoding only the value is ~2x faster than decoding the
   whole entry as a typed tuple (~140 vs ~260 ns, 5-field Struct). An entry skip()
   leaves to the unpacker (ext types, depth) is decoded whole by edec(entry bytes),
   a decoder of tuple[key, T, int, int, int, int]. */
static PyObject *entry_typed(PyObject *vdec, PyObject *edec, PyObject *fail, PyObject *key, const uint8_t *p,
                             size_t n)
{
    const uint8_t *ek, *v0;
    size_t ekn;
    const char *why = NULL;
    PyObject *raw, *v, *e, *k;
    Cur c;
    int is_str, sk;
    if (raw_key(p, n, &ek, &ekn) < 0)
        return corrupt("entry is not a 6-field array with a str/bin key");
    v0 = ek + ekn;
    c.p = v0;
    c.end = p + n;
    c.depth = 0;
    c.punt = 0;
    c.nogil = 0;
    sk = skip(&c, &why);
    if (sk < 0)
        return corrupt("entry value does not unpack");
    if (sk > 0) {
        PyObject *t;
        raw = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
        if (raw == NULL)
            return NULL;
        t = call_decode(edec, fail, key, raw);
        Py_DECREF(raw);
        if (t == NULL)
            return NULL;
        if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 6) {
            Py_DECREF(t);
            PyErr_SetString(PyExc_TypeError, "_get_decoded: the entry decoder must return a 6-item tuple");
            return NULL;
        }
        e = ((PyTypeObject *)EntryType)->tp_alloc((PyTypeObject *)EntryType, 6);
        if (e != NULL)
            for (int i = 0; i < 6; i++)
                PyTuple_SET_ITEM(e, i, Py_NewRef(PyTuple_GET_ITEM(t, i)));
        Py_DECREF(t);
        return e;
    }
    raw = PyBytes_FromStringAndSize((const char *)v0, (Py_ssize_t)(c.p - v0));
    if (raw == NULL)
        return NULL;
    v = call_decode(vdec, fail, key, raw);
    Py_DECREF(raw);
    if (v == NULL)
        return NULL;
    e = ((PyTypeObject *)EntryType)->tp_alloc((PyTypeObject *)EntryType, 6);
    if (e == NULL) {
        Py_DECREF(v);
        return NULL;
    }
    PyTuple_SET_ITEM(e, 1, v);
    is_str = p[1] < 0xc4 || p[1] > 0xc6; /* raw_key accepted only str and bin headers */
    if (is_str ? PyUnicode_CheckExact(key) : PyBytes_CheckExact(key))
        k = Py_NewRef(key);
    else
        k = is_str ? PyUnicode_DecodeUTF8((const char *)ek, (Py_ssize_t)ekn, NULL)
                   : PyBytes_FromStringAndSize((const char *)ek, (Py_ssize_t)ekn);
    if (k == NULL) {
        Py_DECREF(e);
        return NULL;
    }
    PyTuple_SET_ITEM(e, 0, k);
    for (int i = 2; i < 6; i++) {
        PyObject *x = dec(&c);
        if (x == NULL || !PyLong_CheckExact(x)) {
            Py_XDECREF(x);
            Py_DECREF(e);
            if (c.punt || !PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_ValueError)) {
                PyErr_Clear();
                return corrupt("entry revisions are not integers");
            }
            return NULL;
        }
        PyTuple_SET_ITEM(e, i, x);
    }
    return e;
}

/* _get_decoded(vdec, edec, fail, key) -> Entry | None: Reader.typed's get. Base_get's
   fast path without the cache, the entry going to entry_typed (msgspec decoders)
   instead of the unpacker. Anything unusual takes self._get_raw(key) (reader.py) for
   the entry's bytes. The decoders run on a private copy read under one publication,
   so what they raise is about the value, not a torn read. */
static PyObject *Base_get_decoded(Base *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t s1;
    PyObject *vdec, *edec, *fail, *key, *raw, *image, *tmp, *e;
    const uint8_t *k;
    Py_ssize_t kn;
    Scratch s;
    size_t n = 0;
    int found;

    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "_get_decoded(vdec, edec, fail, key) takes 4 arguments");
        return NULL;
    }
    vdec = args[0];
    edec = args[1];
    fail = args[2];
    key = args[3];
    if (self->seqp == NULL || (!PyUnicode_CheckExact(key) && !PyBytes_CheckExact(key)))
        goto slow;
    s1 = __atomic_load_n(self->seqp, __ATOMIC_ACQUIRE);
    if (self->image == NULL || s1 != self->seq)
        goto slow;
    image = Py_NewRef(self->image); /* another thread may install or close meanwhile */
    if (query_bytes(key, &k, &kn, &tmp) < 0) {
        Py_DECREF(image);
        return NULL;
    }
    scratch_init(&s);
    found = find_entry((Image *)image, k, kn, &s, &n);
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the copy above happens before the next load */
    Py_DECREF(image);
    if (found < 0 || __atomic_load_n(self->seqp, __ATOMIC_RELAXED) != s1) {
        scratch_free(&s);
        if (found < 0 && !PyErr_ExceptionMatches(CorruptError) && !PyErr_ExceptionMatches(PyExc_ValueError))
            return NULL;
        PyErr_Clear();
        goto slow;
    }
    e = found ? entry_typed(vdec, edec, fail, key, s.p, n) : Py_NewRef(Py_None);
    scratch_free(&s);
    return e;
slow:
    raw = PyObject_CallMethodOneArg((PyObject *)self, str_get_raw, key);
    if (raw == NULL || raw == Py_None)
        return raw;
    if (!PyBytes_Check(raw)) {
        Py_DECREF(raw);
        PyErr_SetString(PyExc_TypeError, "_get_raw must return bytes or None");
        return NULL;
    }
    e = entry_typed(vdec, edec, fail, key, (const uint8_t *)PyBytes_AS_STRING(raw), (size_t)PyBytes_GET_SIZE(raw));
    Py_DECREF(raw);
    return e;
}

static PyMethodDef Base_methods[] = {
    {"_get_decoded", (PyCFunction)(void (*)(void))Base_get_decoded, METH_FASTCALL,
     "_get_decoded(vdec, edec, fail, key) -> Entry or None (Reader.typed)."},
    {"get", (PyCFunction)Base_get, METH_O,
     "get(key) -> Entry or None. O(1): a seq load and a dict lookup when cached, else one\n"
     "hash probe, a copy out of the mapping, a second seq load and one unpack."},
    {"_core_attach", (PyCFunction)Base_attach, METH_VARARGS, "_core_attach(words, seq_index, cache_size)"},
    {"_core_install", (PyCFunction)Base_install, METH_VARARGS, "_core_install(seq, image, cache, words)"},
    {"_core_close", (PyCFunction)Base_close, METH_NOARGS, "Forget the installed publication."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkeyspace._speedups.ReaderBase",
    .tp_basicsize = sizeof(Base),
    .tp_dealloc = (destructor)Base_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Base of reader.Reader: its get() hot path, compiled.",
    .tp_methods = Base_methods,
    .tp_new = Base_new,
};

/* ------------------------------------------------------------------------- */
/* Writer side: builder.ImageBuilder's kernels.                               */
/* C twins of builder._py_scan, _py_table, _py_find, _py_entry_mod,           */
/* _py_lower_bound and _py_keys_at, which stay the reference (the builder's   */
/* tests run both; tests/test_state.py compares their verdicts on hostile     */
/* images). They read the builder's private memory (its arena, order array   */
/* and table, never shared memory) and hold the GIL, except scan_entries,     */
/* which lets other threads in every 4096 entries. The builder keeps no      */
/* Python object per key: these answer from the arena and table directly.    */

/* A msgpack integer: sign and magnitude (uint64 covers both msgpack ranges). */
typedef struct {
    int neg;
    uint64_t u;
} Int;

/* Skip one value, checking what the readers' unpacker would reject: 0 ok, -1 bad
   (*why says what), 1 punt (ext types, depth, non-str map keys: the unpacker
   decides; with c->nogil also a non-ASCII string, whose UTF-8 check needs the
   GIL). No exception is left set. */
static int skip(Cur *c, const char **why)
{
    uint8_t t;
    uint64_t n = 0;
    int w, map = 0, is_str = 0;
    if (c->p >= c->end) {
        *why = "msgpack value runs past its entry";
        return -1;
    }
    t = *c->p++;
    if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3)
        return 0;
    if (t >= 0xa0 && t <= 0xbf) {
        n = t & 0x1f;
        is_str = 1;
    } else if (t >= 0x80 && t <= 0x9f) {
        n = t & 0x0f;
        map = t < 0x90;
        goto container;
    } else {
        switch (t) {
        case 0xc4: case 0xc5: case 0xc6:
        case 0xd9: case 0xda: case 0xdb:
            w = (t == 0xc4 || t == 0xd9) ? 1 : (t == 0xc5 || t == 0xda) ? 2 : 4;
            if (c->end - c->p < w) {
                *why = "msgpack length runs past its entry";
                return -1;
            }
            n = be(c->p, w);
            c->p += w;
            is_str = t >= 0xd9;
            break;
        case 0xca: case 0xcb: case 0xcc: case 0xcd: case 0xce: case 0xcf:
        case 0xd0: case 0xd1: case 0xd2: case 0xd3:
            w = t == 0xca ? 4 : t == 0xcb ? 8 : 1 << ((t - 0xcc) & 3);
            if (c->end - c->p < w) {
                *why = "msgpack number runs past its entry";
                return -1;
            }
            c->p += w;
            return 0;
        case 0xdc: case 0xdd: case 0xde: case 0xdf:
            w = (t == 0xdc || t == 0xde) ? 2 : 4;
            if (c->end - c->p < w) {
                *why = "msgpack length runs past its entry";
                return -1;
            }
            n = be(c->p, w);
            c->p += w;
            map = t >= 0xde;
            goto container;
        default: /* ext types, 0xc1 */
            return 1;
        }
    }
    /* str or bin of n bytes */
    if (n > (uint64_t)(c->end - c->p)) {
        *why = "msgpack string runs past its entry";
        return -1;
    }
    if (is_str) {
        uint64_t hi = 0;
        size_t i = 0;
        for (; i + 8 <= n; i += 8)
            hi |= rd64(c->p + i);
        for (; i < n; i++)
            hi |= c->p[i];
        if (hi & 0x8080808080808080ULL) {
            PyObject *s;
            if (c->nogil)
                return 1; /* validated by the caller, with the GIL */
            s = PyUnicode_DecodeUTF8((const char *)c->p, (Py_ssize_t)n, NULL);
            if (s == NULL) {
                PyErr_Clear();
                *why = "invalid UTF-8 string";
                return -1;
            }
            Py_DECREF(s);
        }
    }
    c->p += n;
    return 0;
container:
    if (n > (uint64_t)(c->end - c->p)) { /* every element takes at least one byte */
        *why = "msgpack array or map longer than its entry";
        return -1;
    }
    if (++c->depth > MAX_DEPTH)
        return 1;
    for (uint64_t i = 0; i < n; i++) {
        int r;
        if (map) {
            uint8_t k = c->p < c->end ? *c->p : 0;
            if (!((k >= 0xa0 && k <= 0xbf) || k == 0xd9 || k == 0xda || k == 0xdb))
                return 1; /* a non-str map key: the unpacker's call */
            if ((r = skip(c, why)) != 0)
                return r;
        }
        if ((r = skip(c, why)) != 0)
            return r;
    }
    c->depth--;
    return 0;
}

/* One msgpack integer: 0 ok, -1 not an integer (or truncated). */
static int read_int(Cur *c, Int *v)
{
    uint8_t t;
    int w;
    if (c->p >= c->end)
        return -1;
    t = *c->p++;
    v->neg = 0;
    if (t <= 0x7f) {
        v->u = t;
        return 0;
    }
    if (t >= 0xe0) {
        v->neg = 1;
        v->u = (uint64_t)(0x100 - t);
        return 0;
    }
    if (t >= 0xcc && t <= 0xd3) {
        w = 1 << ((t - 0xcc) & 3);
        if (c->end - c->p < w)
            return -1;
        v->u = be(c->p, w);
        c->p += w;
        if (t >= 0xd0 && (v->u >> (8 * w - 1)) & 1) { /* negative: magnitude of the sign-extended value */
            uint64_t s = w < 8 ? v->u | (~(uint64_t)0 << (8 * w)) : v->u;
            v->neg = 1;
            v->u = ~s + 1;
        }
        return 0;
    }
    return -1;
}

/* An int the unpacker returned (the punted entries): -1 if it is not exactly int. */
static int int_of(PyObject *o, Int *v)
{
    int overflow;
    long long x;
    if (!PyLong_CheckExact(o)) /* bool is not an int here, as in the Python check */
        return -1;
    x = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow) { /* beyond int64: only the sign matters to the checks (revisions are int64) */
        v->neg = overflow < 0;
        v->u = UINT64_MAX;
    } else {
        v->neg = x < 0;
        v->u = x < 0 ? (uint64_t)0 - (uint64_t)x : (uint64_t)x;
    }
    return 0;
}

/* The four revision fields of the entry [p, p+n) via the unpacker (punted entries).
   0 ok, -1 error set (ValueError naming entry i). */
static int punted_ints(const uint8_t *p, size_t n, Py_ssize_t i, Int *out)
{
    PyObject *b = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n), *lst;
    int r = 0;
    if (b == NULL)
        return -1;
    lst = PyObject_CallOneArg(Unpackb, b);
    Py_DECREF(b);
    if (lst == NULL) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        PyErr_Format(PyExc_ValueError, "entry %zd does not unpack: %S", i, ev ? ev : Py_None);
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        return -1;
    }
    if (!PyList_CheckExact(lst) || PyList_GET_SIZE(lst) != 6) {
        PyErr_Format(PyExc_ValueError, "entry %zd is not a 6-element array", i);
        r = -1;
    }
    for (int j = 0; r == 0 && j < 4; j++) {
        if (int_of(PyList_GET_ITEM(lst, 2 + j), &out[j]) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "entry %zd has non-integer revisions", i);
            r = -1;
        }
    }
    Py_DECREF(lst);
    return r;
}

/* The revision fields (create, mod, version, lease) of the entry [p, p+n), checking
   the whole entry as the readers' unpacker would. 0 ok, -1 ValueError set. */
static int entry_ints(const uint8_t *p, size_t n, Py_ssize_t i, Int *f)
{
    Cur c = {p + 1, p + n, 0, 0, 0};
    const char *why = NULL;
    int s = skip(&c, &why); /* the key (raw_key checked its type): checks a str key's UTF-8 */
    if (s == 0)
        s = skip(&c, &why); /* the decoded value */
    if (s < 0) {
        PyErr_Format(PyExc_ValueError, "entry %zd does not unpack: %s", i, why);
        return -1;
    }
    if (s > 0)
        return punted_ints(p, n, i, f);
    for (int j = 0; j < 4; j++) {
        if (read_int(&c, &f[j]) < 0) {
            PyErr_Format(PyExc_ValueError, "entry %zd has non-integer revisions", i);
            return -1;
        }
    }
    return 0;
}

/* entry_ints without the GIL, for the common entry: 0 ok; 1 for anything else
   (an error, a punt, a non-ASCII string), which the caller redoes with entry_ints. */
static int entry_ints_nogil(const uint8_t *p, size_t n, Int *f)
{
    Cur c = {p + 1, p + n, 0, 0, 1};
    const char *why = NULL;
    if (skip(&c, &why) != 0 || skip(&c, &why) != 0)
        return 1;
    for (int j = 0; j < 4; j++) {
        if (read_int(&c, &f[j]) < 0)
            return 1;
    }
    return 0;
}

/* Buffers of the positional arguments (PyBUF_SIMPLE): 0 ok, -1 error set (all released). */
static int get_buffers(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, Py_buffer *out, const char *fn)
{
    if (nargs < want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", fn, want);
        return -1;
    }
    for (Py_ssize_t i = 0; i < want; i++) {
        if (PyObject_GetBuffer(args[i], &out[i], PyBUF_SIMPLE) < 0) {
            while (i-- > 0)
                PyBuffer_Release(&out[i]);
            return -1;
        }
    }
    return 0;
}

static void release_buffers(Py_buffer *b, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&b[i]);
}

/* The key of the entry order[i] points at in the arena: 0 ok, -1 ValueError set. */
static int order_key(const Py_buffer *order, const Py_buffer *arena, Py_ssize_t i, const uint8_t **k, size_t *kn)
{
    const uint8_t *o = (const uint8_t *)order->buf + 8 * i;
    uint64_t off = rd32(o), len = rd32(o + 4);
    if (off + len > (uint64_t)arena->len ||
        raw_key((const uint8_t *)arena->buf + off, (size_t)len, k, kn) < 0) {
        PyErr_Format(PyExc_ValueError, "entry %zd is not an entry with a str/bin key inside the arena", i);
        return -1;
    }
    return 0;
}

static inline int key_cmp(const uint8_t *a, size_t an, const uint8_t *b, size_t bn)
{
    size_t m = an < bn ? an : bn;
    int c = memcmp(a, b, m);
    if (c != 0)
        return c;
    return an < bn ? -1 : an > bn;
}

/* scan_entries(arena, order, root, revision[, base]) -> top: builder._py_scan in C (see its doc). */
static PyObject *scan_entries(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b[3]; /* arena, order, root */
    long long rev;
    Py_ssize_t count, i, top_i = -1;
    const uint8_t *last = NULL;
    size_t last_n = 0;
    uint64_t top[3] = {0, 0, 0}; /* create, mod, version of entry top_i */
    Py_ssize_t base = 0;
    int failed = 0;
    PyObject *out = NULL;
    (void)mod;
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "scan_entries(arena, order, root, revision[, base])");
        return NULL;
    }
    rev = PyLong_AsLongLong(args[3]);
    if (rev == -1 && PyErr_Occurred())
        return NULL;
    if (nargs == 5) { /* the index of order's first entry in the image, for messages */
        base = PyLong_AsSsize_t(args[4]);
        if (base == -1 && PyErr_Occurred())
            return NULL;
    }
    if (get_buffers(args, nargs, 3, b, "scan_entries") < 0)
        return NULL;
    if (b[1].len % 8) {
        PyErr_SetString(PyExc_ValueError, "order region is not a whole number of entries");
        goto done;
    }
    count = b[1].len / 8;
    /* Without the GIL (the arena and order are the builder's private copies,
       exported to this call): a resuming writer probes etcd on another thread
       meanwhile (imports, connect), which then runs on the other core instead
       of waiting for the scan. The GIL is taken back for an error, a
       non-ASCII string, or an entry left to the unpacker. */
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < count; i++) {
        const uint8_t *o = (const uint8_t *)b[1].buf + 8 * i, *p, *k;
        uint64_t off = rd32(o), len = rd32(o + 4);
        size_t kn;
        Int f[4]; /* create, mod, version, lease */
        const char *bad = NULL;
        if (off + len > (uint64_t)b[0].len) {
            bad = "lies outside the arena";
        } else if (raw_key((p = (const uint8_t *)b[0].buf + off), len, &k, &kn) < 0) {
            bad = "is not a 6-element array with a str/bin key";
        } else if (entry_ints_nogil(p, len, f) != 0) {
            int r;
            Py_BLOCK_THREADS
            r = entry_ints(p, len, base + i, f);
            Py_UNBLOCK_THREADS
            if (r < 0) {
                failed = 1;
                break;
            }
        }
        /* 0 < create <= mod <= revision; version >= 1; lease >= 0 */
        if (bad == NULL && (f[0].neg || f[1].neg || f[2].neg || f[3].neg || f[0].u == 0 || f[0].u > f[1].u ||
                            f[1].u > (uint64_t)(rev < 0 ? 0 : rev) || f[2].u == 0))
            bad = "has impossible revisions for the file's revision";
        else if (bad == NULL && (kn < (size_t)b[2].len || memcmp(k, b[2].buf, (size_t)b[2].len) != 0))
            bad = "has a key outside the prefix";
        else if (bad == NULL && last != NULL && key_cmp(k, kn, last, last_n) <= 0)
            bad = "breaks the key order (keys not sorted and unique)";
        if (bad != NULL) {
            Py_BLOCK_THREADS
            PyErr_Format(PyExc_ValueError, "entry %zd %s (revision %lld)", base + i, bad, rev);
            Py_UNBLOCK_THREADS
            failed = 1;
            break;
        }
        last = k;
        last_n = kn;
        if (f[1].u > top[1]) {
            top_i = i;
            top[0] = f[0].u;
            top[1] = f[1].u;
            top[2] = f[2].u;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed)
        goto done;
    if (top_i < 0) {
        out = Py_NewRef(Py_None);
    } else {
        const uint8_t *k;
        size_t kn;
        if (order_key(&b[1], &b[0], top_i, &k, &kn) == 0)
            out = Py_BuildValue("(y#KKK)", (const char *)k, (Py_ssize_t)kn, (unsigned long long)top[0],
                                (unsigned long long)top[1], (unsigned long long)top[2]);
    }
done:
    release_buffers(b, 3);
    return out;
}

/* build_table(order, arena, slots) -> bytearray: builder._py_table in C (see its doc). */
static PyObject *build_table(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b[2]; /* order, arena */
    PyObject *table = NULL;
    Py_ssize_t slots, n;
    uint8_t *t;
    uint64_t mask;
    (void)mod;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "build_table(order, arena, slots)");
        return NULL;
    }
    slots = PyLong_AsSsize_t(args[2]);
    if (slots == -1 && PyErr_Occurred())
        return NULL;
    if (get_buffers(args, nargs, 2, b, "build_table") < 0)
        return NULL;
    n = b[0].len / 8;
    if (slots < 8 || (slots & (slots - 1)) != 0 || n >= slots || b[0].len % 8) {
        PyErr_SetString(PyExc_ValueError, "build_table: slots must be a power of two above the entry count");
        goto done;
    }
    table = PyByteArray_FromStringAndSize(NULL, 16 * slots);
    if (table == NULL)
        goto done;
    t = (uint8_t *)PyByteArray_AS_STRING(table);
    memset(t, 0, 16 * (size_t)slots);
    mask = (uint64_t)slots - 1;
    /* In batches: hash 32 keys and prefetch their home slots, then insert them.
       The inserts are random writes into a table bigger than the caches; with
       the prefetch they overlap instead of stalling one by one (1M keys:
       0.27 s -> 0.09 s, measured). Without the GIL (every buffer here is the
       builder's own, exported to this call), except to hash a key over 240
       bytes (the xxhash module) or to report a bad entry. */
    {
        Py_ssize_t bad = -1;
        int failed = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i0 = 0; i0 < n && !failed; i0 += 32) {
            uint64_t hs[32];
            Py_ssize_t m = n - i0 < 32 ? n - i0 : 32;
            for (Py_ssize_t j = 0; j < m; j++) {
                const uint8_t *k, *o = (const uint8_t *)b[0].buf + 8 * (i0 + j);
                uint64_t off = rd32(o), len = rd32(o + 4);
                size_t kn;
                if (off + len > (uint64_t)b[1].len ||
                    raw_key((const uint8_t *)b[1].buf + off, (size_t)len, &k, &kn) < 0) {
                    bad = i0 + j;
                    failed = 1;
                    break;
                }
                if (kn <= 240) {
                    hs[j] = xxh3_short(k, kn);
                    hs[j] = hs[j] ? hs[j] : 1;
                } else {
                    int r;
                    Py_BLOCK_THREADS
                    r = key_hash(k, (Py_ssize_t)kn, &hs[j]);
                    Py_UNBLOCK_THREADS
                    if (r < 0) {
                        failed = 1;
                        break;
                    }
                }
                __builtin_prefetch(t + 16 * (hs[j] & mask), 1);
            }
            for (Py_ssize_t j = 0; j < m && !failed; j++) {
                const uint8_t *o = (const uint8_t *)b[0].buf + 8 * (i0 + j);
                uint64_t pos, ol = (uint64_t)rd32(o) | (uint64_t)rd32(o + 4) << 32;
                for (pos = hs[j] & mask; rd64(t + 16 * pos) != 0; pos = (pos + 1) & mask)
                    ;
                memcpy(t + 16 * pos, &hs[j], 8);
                memcpy(t + 16 * pos + 8, &ol, 8);
            }
        }
        Py_END_ALLOW_THREADS
        if (bad >= 0)
            PyErr_Format(PyExc_ValueError, "entry %zd is not an entry with a str/bin key inside the arena", bad);
        if (failed)
            Py_CLEAR(table);
    }
done:
    release_buffers(b, 2);
    return table;
}

/* find_slot(table, arena, key) -> (slot, offset | length << 32), or (-1, 0): builder._py_find in C. */
static PyObject *find_slot(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b[3]; /* table, arena, key */
    PyObject *out = NULL;
    uint64_t h, mask, slots, i;
    (void)mod;
    if (get_buffers(args, nargs, 3, b, "find_slot") < 0)
        return NULL;
    slots = (uint64_t)b[0].len / 16;
    if (slots < 8 || (slots & (slots - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "find_slot: the table is not a power of two of slots");
        goto done;
    }
    if (key_hash((const uint8_t *)b[2].buf, b[2].len, &h) < 0)
        goto done;
    mask = slots - 1;
    i = h & mask;
    for (uint64_t probes = 0; probes < slots; probes++, i = (i + 1) & mask) {
        const uint8_t *s = (const uint8_t *)b[0].buf + 16 * i, *k;
        uint64_t sh = rd64(s), ol, off, len;
        size_t kn;
        if (sh == 0)
            break;
        if (sh != h)
            continue;
        ol = rd64(s + 8);
        off = ol & 0xFFFFFFFFu;
        len = ol >> 32;
        if (off + len > (uint64_t)b[1].len || raw_key((const uint8_t *)b[1].buf + off, (size_t)len, &k, &kn) < 0) {
            PyErr_Format(PyExc_ValueError, "find_slot: slot %llu points at no entry", (unsigned long long)i);
            goto done;
        }
        if (kn == (size_t)b[2].len && memcmp(k, b[2].buf, kn) == 0) {
            out = Py_BuildValue("(nK)", (Py_ssize_t)i, (unsigned long long)ol);
            goto done;
        }
    }
    out = Py_BuildValue("(ii)", -1, 0);
done:
    release_buffers(b, 3);
    return out;
}

/* entry_mod(arena, offset, length) -> the entry's mod_revision: builder._py_entry_mod in C. */
static PyObject *entry_mod(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer a;
    Py_ssize_t off, len;
    Int f[4];
    PyObject *out = NULL;
    (void)mod;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "entry_mod(arena, offset, length)");
        return NULL;
    }
    off = PyLong_AsSsize_t(args[1]);
    len = PyLong_AsSsize_t(args[2]);
    if ((off == -1 || len == -1) && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &a, PyBUF_SIMPLE) < 0)
        return NULL;
    if (off < 0 || len < 2 || off + len > a.len || ((const uint8_t *)a.buf)[off] != 0x96) {
        PyErr_SetString(PyExc_ValueError, "entry_mod: no entry there");
    } else if (entry_ints((const uint8_t *)a.buf + off, (size_t)len, 0, f) == 0) {
        out = f[1].neg ? PyLong_FromLongLong(-(long long)f[1].u) : PyLong_FromUnsignedLongLong(f[1].u);
    }
    PyBuffer_Release(&a);
    return out;
}

/* lower_bound(order, arena, key) -> position of the first entry with key >= key: builder._py_lower_bound. */
static PyObject *lower_bound_c(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b[3]; /* order, arena, key */
    Py_ssize_t lo = 0, hi;
    PyObject *out = NULL;
    (void)mod;
    if (get_buffers(args, nargs, 3, b, "lower_bound") < 0)
        return NULL;
    hi = b[0].len / 8;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        const uint8_t *k;
        size_t kn;
        if (order_key(&b[0], &b[1], mid, &k, &kn) < 0)
            goto done;
        if (key_cmp(k, kn, (const uint8_t *)b[2].buf, (size_t)b[2].len) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    out = PyLong_FromSsize_t(lo);
done:
    release_buffers(b, 3);
    return out;
}

/* keys_at(order, arena, step) -> [key of entry 0, step, 2*step, ...]: builder._py_keys_at in C. */
static PyObject *keys_at(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b[2]; /* order, arena */
    Py_ssize_t step, n;
    PyObject *out = NULL;
    (void)mod;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "keys_at(order, arena, step)");
        return NULL;
    }
    step = PyLong_AsSsize_t(args[2]);
    if (step == -1 && PyErr_Occurred())
        return NULL;
    if (step < 1) {
        PyErr_SetString(PyExc_ValueError, "keys_at: step must be >= 1");
        return NULL;
    }
    if (get_buffers(args, nargs, 2, b, "keys_at") < 0)
        return NULL;
    n = b[0].len / 8;
    out = PyList_New((n + step - 1) / step);
    for (Py_ssize_t i = 0, j = 0; out != NULL && i < n; i += step, j++) {
        const uint8_t *k;
        size_t kn;
        PyObject *kb;
        if (order_key(&b[0], &b[1], i, &k, &kn) < 0 ||
            (kb = PyBytes_FromStringAndSize((const char *)k, (Py_ssize_t)kn)) == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, j, kb);
    }
    release_buffers(b, 2);
    return out;
}

/* ------------------------------------------------------------------------- */

/* ------------------------------------------------------------------------- */
/* The writer's compiled apply path (shmkeyspace/apply.py owns it and its     */
/* contract): KeySpace.apply's per-event loop for the built-in decoders, one  */
/* call per batch of watch responses. The Python loop (keyspace.py) is the    */
/* reference; tests/test_apply_paths.py requires byte-identical images, the   */
/* same changed keys and the same log records from both on random streams.    */
/*                                                                            */
/* Only the common case is done here. Anything else about an event (a decode  */
/* or pack failure, a value this packer does not take, a type it does not     */
/* know) goes to ``slow(ev)``, the Python path's own decode of that event,    */
/* which logs the failure exactly as the Python path does: so a failure costs */
/* what it costs today, and its outcome and message are the reference's by    */
/* construction. Skipped events are reported to ``skip(code, key, a, b)``    */
/* in stream order (the Python side logs them with the reference messages).   */

enum { K_RAW = 0, K_UTF8 = 1, K_JSON = 2, K_MSGPACK = 3 };

typedef struct {
    uint8_t *b;
    size_t n, cap;
} Out;

static int out_fit(Out *o, size_t more)
{
    if (o->n + more <= o->cap)
        return 0;
    size_t cap = o->cap ? o->cap : 256;
    while (cap < o->n + more)
        cap *= 2;
    uint8_t *nb = PyMem_Realloc(o->b, cap);
    if (nb == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->b = nb;
    o->cap = cap;
    return 0;
}

static inline void put_be(uint8_t *p, uint64_t v, int w)
{
    for (int i = w - 1; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

/* A header byte and a w-byte big-endian length/value. */
static int out_tag(Out *o, uint8_t t, uint64_t v, int w)
{
    if (out_fit(o, 1 + (size_t)w) < 0)
        return -1;
    o->b[o->n] = t;
    put_be(o->b + o->n + 1, v, w);
    o->n += 1 + (size_t)w;
    return 0;
}

static int out_bytes(Out *o, const void *p, size_t n)
{
    if (out_fit(o, n) < 0)
        return -1;
    memcpy(o->b + o->n, p, n);
    o->n += n;
    return 0;
}

/* msgpack-python's integer encodings (Packer: unsigned forms for > 0, signed below). */
static int out_int(Out *o, long long d)
{
    if (d < 0) {
        if (d >= -32)
            return out_tag(o, (uint8_t)d, 0, 0); /* negative fixint 0xe0..0xff */
        if (d >= -128)
            return out_tag(o, 0xd0, (uint64_t)d & 0xff, 1);
        if (d >= -32768)
            return out_tag(o, 0xd1, (uint64_t)d & 0xffff, 2);
        if (d >= -2147483648LL)
            return out_tag(o, 0xd2, (uint64_t)d & 0xffffffffu, 4);
        return out_tag(o, 0xd3, (uint64_t)d, 8);
    }
    uint64_t u = (uint64_t)d;
    if (u < 128)
        return out_tag(o, (uint8_t)u, 0, 0);
    if (u < 256)
        return out_tag(o, 0xcc, u, 1);
    if (u < 65536)
        return out_tag(o, 0xcd, u, 2);
    if (u <= 0xffffffffu)
        return out_tag(o, 0xce, u, 4);
    return out_tag(o, 0xcf, u, 8);
}

static int out_uint64(Out *o, uint64_t u)
{
    if (u <= (uint64_t)INT64_MAX)
        return out_int(o, (long long)u);
    return out_tag(o, 0xcf, u, 8);
}

static int out_str(Out *o, const char *s, size_t n)
{
    int r;
    if (n < 32)
        r = out_tag(o, (uint8_t)(0xa0 | n), 0, 0);
    else if (n < 256)
        r = out_tag(o, 0xd9, n, 1);
    else if (n < 65536)
        r = out_tag(o, 0xda, n, 2);
    else
        r = out_tag(o, 0xdb, n, 4);
    return r < 0 ? -1 : out_bytes(o, s, n);
}

static int out_bin(Out *o, const char *s, size_t n)
{
    int r;
    if (n < 256)
        r = out_tag(o, 0xc4, n, 1);
    else if (n < 65536)
        r = out_tag(o, 0xc5, n, 2);
    else
        r = out_tag(o, 0xc6, n, 4);
    return r < 0 ? -1 : out_bytes(o, s, n);
}

#define PACK_DEPTH 256 /* deeper values go to the Python path (its packer's limit is 511) */

/* Pack ``v`` as msgpack.Packer(use_bin_type=True) does: 0 ok; 1 not taken here
   (no exception: the caller takes the Python path); -1 error set (memory). */
static int pack_obj(Out *o, PyObject *v, int depth)
{
    PyTypeObject *t = Py_TYPE(v);
    if (depth > PACK_DEPTH)
        return 1;
    if (v == Py_None)
        return out_tag(o, 0xc0, 0, 0);
    if (v == Py_True)
        return out_tag(o, 0xc3, 0, 0);
    if (v == Py_False)
        return out_tag(o, 0xc2, 0, 0);
    if (t == &PyLong_Type) {
        int overflow;
        long long d = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (d == -1 && PyErr_Occurred())
            return -1;
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(v);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear(); /* beyond 64 bits: the packer refuses it, the Python path says so */
                return 1;
            }
            return out_uint64(o, u);
        }
        if (overflow < 0)
            return 1;
        return out_int(o, d);
    }
    if (t == &PyFloat_Type) {
        union {
            double d;
            uint64_t u;
        } x;
        x.d = PyFloat_AS_DOUBLE(v);
        return out_tag(o, 0xcb, x.u, 8);
    }
    if (t == &PyUnicode_Type) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (s == NULL) { /* lone surrogates: the packer raises, the Python path says so */
            PyErr_Clear();
            return 1;
        }
        if ((uint64_t)n > 0xffffffffu)
            return 1;
        return out_str(o, s, (size_t)n);
    }
    if (t == &PyBytes_Type) {
        if ((uint64_t)PyBytes_GET_SIZE(v) > 0xffffffffu)
            return 1;
        return out_bin(o, PyBytes_AS_STRING(v), (size_t)PyBytes_GET_SIZE(v));
    }
    if (t == &PyList_Type || t == &PyTuple_Type) {
        Py_ssize_t n = Py_SIZE(v);
        PyObject **items = t == &PyList_Type ? ((PyListObject *)v)->ob_item : ((PyTupleObject *)v)->ob_item;
        int r;
        if ((uint64_t)n > 0xffffffffu)
            return 1;
        r = n < 16 ? out_tag(o, (uint8_t)(0x90 | n), 0, 0) : n < 65536 ? out_tag(o, 0xdc, n, 2) : out_tag(o, 0xdd, n, 4);
        if (r < 0)
            return -1;
        for (Py_ssize_t i = 0; i < Py_SIZE(v); i++) { /* a list holds only what we made: no callback runs */
            r = pack_obj(o, items[i], depth + 1);
            if (r != 0)
                return r;
        }
        return 0;
    }
    if (t == &PyDict_Type) {
        Py_ssize_t n = PyDict_GET_SIZE(v), pos = 0;
        PyObject *k, *x;
        int r;
        if ((uint64_t)n > 0xffffffffu)
            return 1;
        r = n < 16 ? out_tag(o, (uint8_t)(0x80 | n), 0, 0) : n < 65536 ? out_tag(o, 0xde, n, 2) : out_tag(o, 0xdf, n, 4);
        if (r < 0)
            return -1;
        while (PyDict_Next(v, &pos, &k, &x)) {
            /* str keys only: other keys (msgpack maps) may not unpack in readers; the
               Python path's round trip decides. */
            if (!PyUnicode_CheckExact(k))
                return 1;
            r = pack_obj(o, k, depth + 1);
            if (r == 0)
                r = pack_obj(o, x, depth + 1);
            if (r != 0)
                return r;
        }
        return 0;
    }
    return 1;
}

/* The table slot of ``key`` in the builder's (table, arena): its offset | length << 32,
   or -1 absent; -2 error set. The probe is find_slot's. */
static long long table_find(const Py_buffer *table, const Py_buffer *arena, const uint8_t *key, size_t kn)
{
    uint64_t h, slots = (uint64_t)table->len / 16, mask, i;
    if (slots < 8 || (slots & (slots - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "apply_events: the table is not a power of two of slots");
        return -2;
    }
    if (key_hash(key, (Py_ssize_t)kn, &h) < 0)
        return -2;
    mask = slots - 1;
    i = h & mask;
    for (uint64_t probes = 0; probes < slots; probes++, i = (i + 1) & mask) {
        const uint8_t *s = (const uint8_t *)table->buf + 16 * i, *k;
        uint64_t sh = rd64(s), ol, off, len;
        size_t skn;
        if (sh == 0)
            break;
        if (sh != h)
            continue;
        ol = rd64(s + 8);
        off = ol & 0xFFFFFFFFu;
        len = ol >> 32;
        if (off + len > (uint64_t)arena->len || raw_key((const uint8_t *)arena->buf + off, (size_t)len, &k, &skn) < 0) {
            PyErr_Format(PyExc_ValueError, "apply_events: slot %llu points at no entry", (unsigned long long)i);
            return -2;
        }
        if (skn == kn && memcmp(k, key, kn) == 0)
            return (long long)ol;
    }
    return -1;
}

/* An int field of an event (int(x) in the Python path): 0 ok, -1 error set. */
static int field_ll(PyObject *kv, PyObject *name, long long *out)
{
    PyObject *v = PyObject_GetAttr(kv, name), *i;
    if (v == NULL)
        return -1;
    i = PyNumber_Index(v);
    Py_DECREF(v);
    if (i == NULL)
        return -1;
    *out = PyLong_AsLongLong(i);
    Py_DECREF(i);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *s_events, *s_event_, *s_kv, *s_key, *s_value, *s_create, *s_mod, *s_version, *s_lease;

/* The long-digit test of decoders.json: a run of 19+ digits goes to the standard parser. */
static int long_digits(const char *p, Py_ssize_t n)
{
    int run = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] >= '0' && p[i] <= '9') {
            if (++run >= 19)
                return 1;
        } else {
            run = 0;
        }
    }
    return 0;
}

/* Decode (kind) and pack the entry of a put into o: 0 ok, 1 take the Python path,
   -1 error set. ``fns`` = (orjson.loads, msgpack.unpackb, ormsgpack.unpackb). */
static int fast_entry(Out *o, int kind, PyObject *fns, PyObject *key, PyObject *value, const long long *ints)
{
    const char *kp = PyBytes_AS_STRING(key), *vp = PyBytes_AS_STRING(value);
    Py_ssize_t kn = PyBytes_GET_SIZE(key), vn = PyBytes_GET_SIZE(value);
    PyObject *u, *dec = NULL;
    int r;
    o->n = 0;
    if (out_tag(o, 0x96, 0, 0) < 0)
        return -1;
    u = PyUnicode_DecodeUTF8(kp, kn, NULL); /* entry_key: str when UTF-8, else bin */
    if (u == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return -1;
        PyErr_Clear();
        r = out_bin(o, kp, (size_t)kn);
    } else {
        Py_DECREF(u);
        r = out_str(o, kp, (size_t)kn);
    }
    if (r < 0)
        return -1;
    if (kind == K_RAW) {
        r = out_bin(o, vp, (size_t)vn);
    } else if (kind == K_UTF8) {
        u = PyUnicode_DecodeUTF8(vp, vn, NULL);
        if (u == NULL) {
            PyErr_Clear();
            return 1;
        }
        Py_DECREF(u);
        r = out_str(o, vp, (size_t)vn);
    } else {
        PyObject *fn = PyTuple_GET_ITEM(fns, kind == K_JSON ? 0 : 1);
        if (kind == K_JSON && long_digits(vp, vn))
            return 1;
        dec = PyObject_CallOneArg(fn, value);
        if (dec == NULL) {
            PyErr_Clear(); /* the Python path decodes it again and reports what it says */
            return 1;
        }
        r = pack_obj(o, dec, 1);
        Py_DECREF(dec);
    }
    if (r != 0)
        return r;
    for (int j = 0; j < 4; j++) {
        if (out_int(o, ints[j]) < 0)
            return -1;
    }
    if (kind == K_MSGPACK) { /* pack_entry(verify=True): the readers' unpacker must take it */
        PyObject *b = PyBytes_FromStringAndSize((const char *)o->b, (Py_ssize_t)o->n), *x;
        if (b == NULL)
            return -1;
        x = PyObject_CallOneArg(PyTuple_GET_ITEM(fns, 2), b);
        Py_DECREF(b);
        if (x == NULL) {
            PyErr_Clear();
            return 1;
        }
        Py_DECREF(x);
    }
    return 0;
}

/* apply_events(responses, root_key, floor, pending, table, arena, excluded, kind, fns,
 *              slow, skip, changed, revision) -> revision
 *
 * KeySpace.apply's loop over the events of ``responses`` (see keyspace.py, the
 * reference): ``floor`` is header.revision before the batch; a key's current
 * mod_revision is pending's (the batch so far, store.PackedStore.pending) or
 * the builder's entry's (table, arena). Records upserts as pending[key] =
 * (packed entry, mod_revision) and removals as pending[key] = None, keeps
 * ``excluded`` (keys whose value failed to decode) and ``changed`` (keys the
 * batch changed), and returns the greatest applied mod_revision (or
 * ``revision``). ``skip(code, key, a, b)``: code 0 outside root, 1 stale (a =
 * mod_revision, b = the mirror's revision), 2 deletion of an unknown key (a =
 * revision). ``slow(ev)`` -> packed entry or None (decode failed, logged).
 * The builder must not change during the call (the caller holds the KeySpace lock).
 */
static PyObject *apply_events(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *responses, *root, *pending, *excluded, *fns, *slow, *skip_fn, *changed;
    long long floor_rev, revision;
    int kind;
    Py_buffer tb, ab;
    Out o = {NULL, 0, 0};
    PyObject *result = NULL;
    PyTypeObject *del_t = NULL, *put_t = NULL; /* the event types seen, by name */
    (void)mod;
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "apply_events takes 13 arguments");
        return NULL;
    }
    responses = args[0];
    root = args[1];
    pending = args[3];
    excluded = args[6];
    fns = args[8];
    slow = args[9];
    skip_fn = args[10];
    changed = args[11];
    floor_rev = PyLong_AsLongLong(args[2]);
    kind = (int)PyLong_AsLong(args[7]);
    revision = PyLong_AsLongLong(args[12]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyTuple_Check(responses) || !PyBytes_Check(root) || !PyDict_Check(pending) || !PyAnySet_Check(excluded) ||
        !PyTuple_Check(fns) || PyTuple_GET_SIZE(fns) != 3 || !PyAnySet_Check(changed) || kind < K_RAW ||
        kind > K_MSGPACK) {
        PyErr_SetString(PyExc_TypeError, "apply_events: bad arguments");
        return NULL;
    }
    if (PyObject_GetBuffer(args[4], &tb, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[5], &ab, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&tb);
        return NULL;
    }
    for (Py_ssize_t r = 0; r < PyTuple_GET_SIZE(responses); r++) {
        PyObject *evs = PyObject_GetAttr(PyTuple_GET_ITEM(responses, r), s_events), *seq;
        if (evs == NULL)
            goto done;
        seq = PySequence_Fast(evs, "watch response events must be a sequence");
        Py_DECREF(evs);
        if (seq == NULL)
            goto done;
        for (Py_ssize_t e = 0; e < PySequence_Fast_GET_SIZE(seq); e++) {
            PyObject *ev = PySequence_Fast_GET_ITEM(seq, e), *src, *key = NULL, *value = NULL, *p, *cur_obj, *rec;
            long long ints[4], cur = -1; /* create, mod, version, lease */
            int is_del, present = 0;
            PyTypeObject *et = Py_TYPE(ev);
            if (et == del_t) {
                is_del = 1;
            } else if (et == put_t) {
                is_del = 0;
            } else {
                const char *name = strrchr(et->tp_name, '.');
                name = name ? name + 1 : et->tp_name;
                is_del = strcmp(name, "DeleteEvent") == 0; /* keyspace._is_delete */
                if (is_del)
                    del_t = et;
                else
                    put_t = et;
            }
            /* pyetcd's and etcd3's events wrap the protobuf Event as _event: read its kv
               directly (their __getattr__ does the same, at ~0.5 us a field). */
            src = PyObject_GetAttr(ev, s_event_);
            if (src != NULL) {
                PyObject *kv = PyObject_GetAttr(src, s_kv);
                Py_DECREF(src);
                src = kv;
            } else {
                PyErr_Clear();
                src = Py_NewRef(ev);
            }
            if (src == NULL)
                goto fail_seq;
            key = PyObject_GetAttr(src, s_key);
            if (key != NULL && !PyBytes_CheckExact(key))
                Py_XSETREF(key, PyBytes_FromObject(key));
            if (key == NULL || field_ll(src, s_mod, &ints[1]) < 0) {
                Py_DECREF(src);
                goto fail_ev;
            }
            if (PyBytes_GET_SIZE(key) < PyBytes_GET_SIZE(root) ||
                memcmp(PyBytes_AS_STRING(key), PyBytes_AS_STRING(root), PyBytes_GET_SIZE(root)) != 0) {
                Py_DECREF(src);
                rec = PyObject_CallFunction(skip_fn, "iOLL", 0, key, 0LL, 0LL);
                if (rec == NULL)
                    goto fail_ev;
                Py_DECREF(rec);
                Py_DECREF(key);
                continue;
            }
            p = PyDict_GetItemWithError(pending, key); /* borrowed */
            if (p != NULL) {
                if (p != Py_None) {
                    present = 1;
                    cur_obj = PyTuple_GET_ITEM(p, 1);
                    cur = PyLong_AsLongLong(cur_obj);
                    if (cur == -1 && PyErr_Occurred()) {
                        Py_DECREF(src);
                        goto fail_ev;
                    }
                }
            } else if (PyErr_Occurred()) {
                Py_DECREF(src);
                goto fail_ev;
            } else {
                long long ol = table_find(&tb, &ab, (const uint8_t *)PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key));
                Int f[4];
                if (ol == -2) {
                    Py_DECREF(src);
                    goto fail_ev;
                }
                if (ol >= 0) {
                    uint64_t off = (uint64_t)ol & 0xFFFFFFFFu, len = (uint64_t)ol >> 32;
                    if (len < 2 || entry_ints((const uint8_t *)ab.buf + off, (size_t)len, 0, f) < 0) {
                        Py_DECREF(src);
                        goto fail_ev;
                    }
                    cur = f[1].neg ? -(long long)f[1].u : (long long)f[1].u;
                    present = 1;
                }
            }
            if (ints[1] <= floor_rev || (present && cur >= ints[1])) {
                long long m = present && cur > floor_rev ? cur : floor_rev;
                Py_DECREF(src);
                rec = PyObject_CallFunction(skip_fn, "iOLL", 1, key, ints[1], m);
                if (rec == NULL)
                    goto fail_ev;
                Py_DECREF(rec);
                Py_DECREF(key);
                continue;
            }
            if (is_del) {
                int ex;
                Py_DECREF(src);
                ex = present ? 0 : PySet_Contains(excluded, key);
                if (ex < 0)
                    goto fail_ev;
                if (!present && !ex) {
                    rec = PyObject_CallFunction(skip_fn, "iOLL", 2, key, ints[1], 0LL);
                    if (rec == NULL)
                        goto fail_ev;
                    Py_DECREF(rec);
                    Py_DECREF(key);
                    continue;
                }
                if (PyDict_SetItem(pending, key, Py_None) < 0 || PySet_Discard(excluded, key) < 0)
                    goto fail_ev;
            } else {
                PyObject *packed = NULL, *entry;
                int fr;
                value = PyObject_GetAttr(src, s_value);
                if (value != NULL && !PyBytes_CheckExact(value))
                    Py_XSETREF(value, PyBytes_FromObject(value));
                if (value == NULL || field_ll(src, s_create, &ints[0]) < 0 || field_ll(src, s_version, &ints[2]) < 0 ||
                    field_ll(src, s_lease, &ints[3]) < 0) {
                    Py_DECREF(src);
                    goto fail_ev;
                }
                Py_DECREF(src);
                fr = fast_entry(&o, kind, fns, key, value, ints);
                if (fr < 0)
                    goto fail_ev;
                if (fr == 0) {
                    packed = PyBytes_FromStringAndSize((const char *)o.b, (Py_ssize_t)o.n);
                    if (packed == NULL)
                        goto fail_ev;
                } else {
                    packed = PyObject_CallOneArg(slow, ev);
                    if (packed == NULL)
                        goto fail_ev;
                }
                if (packed == Py_None) {
                    Py_DECREF(packed);
                    if (PySet_Add(excluded, key) < 0 || PyDict_SetItem(pending, key, Py_None) < 0)
                        goto fail_ev;
                } else {
                    entry = Py_BuildValue("(NL)", packed, ints[1]);
                    if (entry == NULL || PySet_Discard(excluded, key) < 0 || PyDict_SetItem(pending, key, entry) < 0) {
                        Py_XDECREF(entry);
                        goto fail_ev;
                    }
                    Py_DECREF(entry);
                }
                Py_CLEAR(value);
            }
            if (PySet_Add(changed, key) < 0)
                goto fail_ev;
            if (ints[1] > revision)
                revision = ints[1];
            Py_DECREF(key);
            continue;
        fail_ev:
            Py_XDECREF(key);
            Py_XDECREF(value);
        fail_seq:
            Py_DECREF(seq);
            goto done;
        }
        Py_DECREF(seq);
    }
    result = PyLong_FromLongLong(revision);
done:
    PyMem_Free(o.b);
    PyBuffer_Release(&tb);
    PyBuffer_Release(&ab);
    return result;
}

/* update_entries(items, start, table, arena, order, dirty_slots, dirty_pos)
 *     -> (next, garbage, appended)
 *
 * ImageBuilder._apply_one(table=True) for the run of items[start:] that update a
 * key already present ((key, (packed, mod)) with key in the table), in order:
 * the entry is appended to ``arena`` (a bytearray), the key's table slot and
 * order pair point at it, the slot and position go into the dirty sets (unless
 * None). Stops at the first item that inserts or deletes (the builder does it
 * in Python) and returns its index, with the bytes that became garbage and the
 * entries appended. The image stays what the Python code makes, byte for byte.
 */
static PyObject *update_entries(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *items, *arena, *dslots, *dpos;
    Py_ssize_t i, start;
    Py_buffer tb, ob;
    unsigned long long garbage = 0, appended = 0;
    PyObject *out = NULL;
    (void)mod;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "update_entries takes 7 arguments");
        return NULL;
    }
    items = args[0];
    arena = args[3];
    dslots = args[5];
    dpos = args[6];
    start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    if (!PyList_CheckExact(items) || !PyByteArray_CheckExact(arena) || (dslots != Py_None && !PySet_Check(dslots)) ||
        (dpos != Py_None && !PySet_Check(dpos))) {
        PyErr_SetString(PyExc_TypeError, "update_entries: bad arguments");
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &tb, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[4], &ob, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&tb);
        return NULL;
    }
    for (i = start; i < PyList_GET_SIZE(items); i++) {
        PyObject *it = PyList_GET_ITEM(items, i), *key, *p, *packed;
        Py_buffer arena_view, pk;
        long long ol;
        Py_ssize_t lo = 0, hi = ob.len / 8, off, n;
        uint64_t h, mask, slot, slots = (uint64_t)tb.len / 16;
        if (!PyTuple_CheckExact(it) || PyTuple_GET_SIZE(it) != 2)
            break;
        key = PyTuple_GET_ITEM(it, 0);
        p = PyTuple_GET_ITEM(it, 1);
        if (!PyBytes_CheckExact(key) || !PyTuple_CheckExact(p) || PyTuple_GET_SIZE(p) != 2)
            break; /* a delete (None), or anything unusual: the Python code */
        packed = PyTuple_GET_ITEM(p, 0);
        /* the slot: table_find's probe, keeping the slot index */
        arena_view.buf = PyByteArray_AS_STRING(arena);
        arena_view.len = PyByteArray_GET_SIZE(arena);
        ol = table_find(&tb, &arena_view, (const uint8_t *)PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key));
        if (ol == -2)
            goto done;
        if (ol == -1)
            break; /* a new key */
        if (key_hash((const uint8_t *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), &h) < 0)
            goto done;
        mask = slots - 1;
        for (slot = h & mask;; slot = (slot + 1) & mask)
            if (rd64((const uint8_t *)tb.buf + 16 * slot + 8) == (uint64_t)ol && rd64((const uint8_t *)tb.buf + 16 * slot) == h)
                break;
        /* the position: lower_bound over the order array */
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            const uint8_t *o = (const uint8_t *)ob.buf + 8 * mid, *k;
            uint64_t eo = rd32(o), el = rd32(o + 4);
            size_t kn;
            if (eo + el > (uint64_t)arena_view.len || raw_key((const uint8_t *)arena_view.buf + eo, (size_t)el, &k, &kn) < 0) {
                PyErr_Format(PyExc_ValueError, "update_entries: order entry %zd is not an entry", mid);
                goto done;
            }
            if (key_cmp(k, kn, (const uint8_t *)PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key)) < 0)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (PyObject_GetBuffer(packed, &pk, PyBUF_SIMPLE) < 0)
            goto done;
        off = PyByteArray_GET_SIZE(arena);
        n = pk.len;
        if ((uint64_t)n >> 32 || (uint64_t)(off + n) >> 32 || PyByteArray_Resize(arena, off + n) < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_OverflowError, "update_entries: past the format's 4 GiB offsets");
            PyBuffer_Release(&pk);
            goto done;
        }
        memcpy(PyByteArray_AS_STRING(arena) + off, pk.buf, (size_t)n);
        PyBuffer_Release(&pk);
        garbage += (uint64_t)ol >> 32;
        appended++;
        {
            uint64_t nol = (uint64_t)off | (uint64_t)n << 32;
            uint32_t o32 = (uint32_t)off, n32 = (uint32_t)n;
            memcpy((uint8_t *)tb.buf + 16 * slot + 8, &nol, 8);
            memcpy((uint8_t *)ob.buf + 8 * lo, &o32, 4);
            memcpy((uint8_t *)ob.buf + 8 * lo + 4, &n32, 4);
        }
        if (dslots != Py_None) {
            PyObject *x = PyLong_FromUnsignedLongLong(slot);
            if (x == NULL || PySet_Add(dslots, x) < 0) {
                Py_XDECREF(x);
                goto done;
            }
            Py_DECREF(x);
        }
        if (dpos != Py_None) {
            PyObject *x = PyLong_FromSsize_t(lo);
            if (x == NULL || PySet_Add(dpos, x) < 0) {
                Py_XDECREF(x);
                goto done;
            }
            Py_DECREF(x);
        }
    }
    out = Py_BuildValue("(nKK)", i, garbage, appended);
done:
    PyBuffer_Release(&tb);
    PyBuffer_Release(&ob);
    return out;
}

/* pack_value(kind, fns, key, value, create, mod, version, lease) -> packed entry or None
   (None: the Python path must decide): the fast decode + pack of one value (tests). */
static PyObject *py_pack_value(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    long long ints[4];
    Out o = {NULL, 0, 0};
    int kind, r;
    PyObject *out;
    (void)mod;
    if (nargs != 8 || !PyBytes_CheckExact(args[2]) || !PyBytes_CheckExact(args[3]) || !PyTuple_Check(args[1]) ||
        PyTuple_GET_SIZE(args[1]) != 3) {
        PyErr_SetString(PyExc_TypeError, "pack_value(kind, fns, key: bytes, value: bytes, create, mod, version, lease)");
        return NULL;
    }
    kind = (int)PyLong_AsLong(args[0]);
    for (int j = 0; j < 4; j++)
        ints[j] = PyLong_AsLongLong(args[4 + j]);
    if (PyErr_Occurred())
        return NULL;
    if (kind < K_RAW || kind > K_MSGPACK) {
        PyErr_SetString(PyExc_ValueError, "pack_value: unknown kind");
        return NULL;
    }
    r = fast_entry(&o, kind, args[1], args[2], args[3], ints);
    out = r < 0 ? NULL : r > 0 ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize((const char *)o.b, (Py_ssize_t)o.n);
    PyMem_Free(o.b);
    return out;
}

/* ------------------------------------------------------------------------- */

/* setup(Entry, CorruptSegmentError, unpackb, xxh3_64_intdigest) */
static PyObject *setup(PyObject *mod, PyObject *args)
{
    PyObject *entry, *err, *unpackb, *xxh;
    (void)mod;
    if (!PyArg_ParseTuple(args, "O!OOO:setup", &PyType_Type, &entry, &err, &unpackb, &xxh))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)entry, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "Entry must be a tuple subclass");
        return NULL;
    }
    Py_XSETREF(EntryType, Py_NewRef(entry));
    Py_XSETREF(CorruptError, Py_NewRef(err));
    Py_XSETREF(Unpackb, Py_NewRef(unpackb));
    Py_XSETREF(Xxh3Long, Py_NewRef(xxh));
    Py_RETURN_NONE;
}

/* key_hash(bytes) -> int: snapshot.key_hash, for tests. */
static PyObject *py_key_hash(PyObject *mod, PyObject *arg)
{
    uint64_t h;
    (void)mod;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "key_hash takes bytes");
        return NULL;
    }
    if (key_hash((const uint8_t *)PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg), &h) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(h);
}

/* unpack_entry(bytes) -> Entry: the entry decoder, for tests. */
static PyObject *py_unpack_entry(PyObject *mod, PyObject *arg)
{
    (void)mod;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "unpack_entry takes bytes");
        return NULL;
    }
    return decode_entry((const uint8_t *)PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg), NULL);
}

static PyMethodDef module_methods[] = {
    {"setup", setup, METH_VARARGS, "setup(Entry, CorruptSegmentError, unpackb, xxh3_64_intdigest)"},
    {"key_hash", py_key_hash, METH_O, "snapshot.key_hash in C (tests)."},
    {"unpack_entry", py_unpack_entry, METH_O, "The entry decoder (tests)."},
    {"scan_entries", (PyCFunction)(void (*)(void))scan_entries, METH_FASTCALL, "builder._py_scan in C."},
    {"build_table", (PyCFunction)(void (*)(void))build_table, METH_FASTCALL, "builder._py_table in C."},
    {"find_slot", (PyCFunction)(void (*)(void))find_slot, METH_FASTCALL, "builder._py_find in C."},
    {"entry_mod", (PyCFunction)(void (*)(void))entry_mod, METH_FASTCALL, "builder._py_entry_mod in C."},
    {"lower_bound", (PyCFunction)(void (*)(void))lower_bound_c, METH_FASTCALL, "builder._py_lower_bound in C."},
    {"keys_at", (PyCFunction)(void (*)(void))keys_at, METH_FASTCALL, "builder._py_keys_at in C."},
    {"apply_events", (PyCFunction)(void (*)(void))apply_events, METH_FASTCALL,
     "KeySpace.apply's event loop for the built-in decoders (apply.py)."},
    {"update_entries", (PyCFunction)(void (*)(void))update_entries, METH_FASTCALL,
     "ImageBuilder._apply_one for a run of updates of present keys (apply.py)."},
    {"pack_value", (PyCFunction)(void (*)(void))py_pack_value, METH_FASTCALL, "apply_events' decode + pack (tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "shmkeyspace._speedups", "Compiled read path of shmkeyspace.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    PyObject *m;
    if (PyType_Ready(&ImageType) < 0 || PyType_Ready(&BaseType) < 0)
        return NULL;
    str_get_slow = PyUnicode_InternFromString("_get_slow");
    str_py_get = PyUnicode_InternFromString("_py_get");
    str_get_raw = PyUnicode_InternFromString("_get_raw");
    if (str_get_slow == NULL || str_py_get == NULL || str_get_raw == NULL)
        return NULL;
    s_events = PyUnicode_InternFromString("events");
    s_event_ = PyUnicode_InternFromString("_event");
    s_kv = PyUnicode_InternFromString("kv");
    s_key = PyUnicode_InternFromString("key");
    s_value = PyUnicode_InternFromString("value");
    s_create = PyUnicode_InternFromString("create_revision");
    s_mod = PyUnicode_InternFromString("mod_revision");
    s_version = PyUnicode_InternFromString("version");
    s_lease = PyUnicode_InternFromString("lease");
    if (!s_events || !s_event_ || !s_kv || !s_key || !s_value || !s_create || !s_mod || !s_version || !s_lease)
        return NULL;
    m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ImageType);
    Py_INCREF(&BaseType);
    if (PyModule_AddObject(m, "Image", (PyObject *)&ImageType) < 0 ||
        PyModule_AddObject(m, "ReaderBase", (PyObject *)&BaseType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
