/* keymesh._native: the Python package's hot path over the C ABI (keymesh.h).
 *
 * What it holds: the Key type (a str subclass that remembers its lease
 * ticket and key name; masked repr) and Pool, the owner of one km_pool
 * handle, whose acquire/poll/release/mark_failed/mark_rate_limited/cancel
 * are one C call each instead of ctypes' marshalling of option structs.
 * Everything cold (create, connect, status, add_key, admin calls, header
 * parsing) stays in ctypes (_lib.py / _core.py), over the same loaded
 * libkeymesh.so: _lib loads the library first and this module's
 * DT_NEEDED libkeymesh.so.0 resolves to that copy (checked by
 * library_address()).
 *
 * The safety the C ABI gives (fork checks, lease ownership by process and
 * ticket) is the library's; this module adds what ctypes did not do for
 * us either: range checks of every number (ConfigError naming the
 * argument, never a silent wrap), and the GIL released only around a call
 * that may block (an acquire that may wait, and the first call after a
 * fork, which may re-register an attached pool with its broker).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

#include <keymesh/keymesh.h>

/* ---- Module state (set once by _setup) ---------------------------------- */

static PyObject* g_error_factory; /* (rc, raw bytes|None, name|None) -> exception */
static PyObject* g_config_error;  /* keymesh.exceptions.ConfigError */

/* Bumped in every child after fork(): a pool's first call in a new process
 * may reconnect to its broker, so it runs with the GIL released. */
static volatile unsigned long g_fork_generation;
static void AfterForkInChild(void) { g_fork_generation++; }

#define MAX_SECONDS 1e9

/* ConfigError (a ValueError) with a PyErr_Format message naming the argument. */
#define CONFIG_ERROR(...) PyErr_Format(g_config_error ? g_config_error : PyExc_ValueError, __VA_ARGS__)

/* Raises the KeyMesh exception of status rc (built by the Python factory,
 * which reads km_last_error() on this thread and masks the key). */
static PyObject* RaiseCode(int rc, PyObject* raw, PyObject* name) {
  if (g_error_factory == NULL) {
    PyErr_Format(PyExc_RuntimeError, "keymesh._native: error %d before _setup()", rc);
    return NULL;
  }
  PyObject* e = PyObject_CallFunction(g_error_factory, "iOO", rc, raw ? raw : Py_None, name ? name : Py_None);
  if (e == NULL) return NULL;
  PyErr_SetObject((PyObject*)Py_TYPE(e), e);
  Py_DECREF(e);
  return NULL;
}

/* A duration argument: None -> dflt; else a finite number in [0, MAX_SECONDS]
 * (a bool or a str is refused). Returns 0, or -1 with ConfigError set. */
static int Seconds(PyObject* v, const char* what, double dflt, double* out) {
  if (v == NULL || v == Py_None) {
    *out = dflt;
    return 0;
  }
  if (PyFloat_CheckExact(v)) {
    *out = PyFloat_AS_DOUBLE(v);
  } else if (PyBool_Check(v) || PyUnicode_Check(v) || PyBytes_Check(v)) {
    CONFIG_ERROR("%s must be a finite number of seconds >= 0, not %s %R", what, Py_TYPE(v)->tp_name, v);
    return -1;
  } else {
    *out = PyFloat_AsDouble(v);
    if (*out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      CONFIG_ERROR("%s must be a finite number of seconds >= 0, not %s %R", what, Py_TYPE(v)->tp_name, v);
      return -1;
    }
  }
  if (!(*out >= 0.0 && *out <= MAX_SECONDS)) { /* also NaN */
    CONFIG_ERROR("%s must be a finite number of seconds >= 0 and <= 1000000000, not %R", what, v);
    return -1;
  }
  return 0;
}

/* A token count: None -> 0; else an integer in [0, 2**64-1] (an integral
 * float is taken, a bool or 2.5 is not). */
static int Tokens(PyObject* v, uint64_t* out) {
  if (v == NULL || v == Py_None) {
    *out = 0;
    return 0;
  }
  if (PyLong_CheckExact(v)) { /* the common case, without PyNumber_Index */
    unsigned long long u = PyLong_AsUnsignedLongLong(v);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
      PyErr_Clear();
      CONFIG_ERROR("tokens must be between 0 and 18446744073709551615, not %R", v);
      return -1;
    }
    *out = (uint64_t)u;
    return 0;
  }
  if (PyBool_Check(v)) {
    CONFIG_ERROR("tokens must be an integer, not a bool");
    return -1;
  }
  if (PyFloat_Check(v)) {
    double d = PyFloat_AS_DOUBLE(v);
    if (!(d >= 0.0 && d < 18446744073709551616.0) || floor(d) != d) {
      CONFIG_ERROR("tokens must be an integer between 0 and 18446744073709551615, not %R", v);
      return -1;
    }
    *out = (uint64_t)d;
    return 0;
  }
  if (!PyLong_Check(v) && !PyIndex_Check(v)) {
    CONFIG_ERROR("tokens must be an integer, not %s %R", Py_TYPE(v)->tp_name, v);
    return -1;
  }
  PyObject* n = PyNumber_Index(v);
  if (n == NULL) return -1;
  unsigned long long u = PyLong_AsUnsignedLongLong(n);
  if (u == (unsigned long long)-1 && PyErr_Occurred()) {
    PyErr_Clear();
    CONFIG_ERROR("tokens must be between 0 and 18446744073709551615, not %S", n);
    Py_DECREF(n);
    return -1;
  }
  Py_DECREF(n);
  *out = (uint64_t)u;
  return 0;
}

/* ---- Key ------------------------------------------------------------------ */

typedef struct {
  PyUnicodeObject base;
  PyObject* raw;  /* bytes: the secret as the library returned it (NULL: built from Python) */
  PyObject* name; /* str: the key's name in the pool */
  uint64_t ticket;
} KeyObject;

static PyTypeObject KeyType;

static void Key_dealloc(PyObject* self) {
  KeyObject* k = (KeyObject*)self;
  Py_CLEAR(k->raw);
  Py_CLEAR(k->name);
  PyUnicode_Type.tp_dealloc(self);
}

static PyObject* Key_repr(PyObject* self) {
  KeyObject* k = (KeyObject*)self;
  Py_ssize_t n = PyUnicode_GET_LENGTH(self);
  PyObject* masked = n >= 12 ? PyUnicode_Substring(self, n - 4, n) : PyUnicode_FromString("");
  if (masked == NULL) return NULL;
  PyObject* r =
      PyUnicode_FromFormat("<keymesh key %R %s%U>", k->name ? k->name : Py_None, n >= 12 ? "..." : "***", masked);
  Py_DECREF(masked);
  return r;
}

static PyObject* Key_reduce(PyObject* self, PyObject* Py_UNUSED(ignored)) {
  /* A copy or pickle is a plain str: a lease cannot move to another object. */
  PyObject* s = PyUnicode_FromKindAndData(PyUnicode_KIND(self), PyUnicode_DATA(self), PyUnicode_GET_LENGTH(self));
  if (s == NULL) return NULL;
  return Py_BuildValue("(O(N))", (PyObject*)&PyUnicode_Type, s);
}

static PyObject* Key_get_raw(PyObject* self, void* Py_UNUSED(closure)) {
  KeyObject* k = (KeyObject*)self;
  if (k->raw) return Py_NewRef(k->raw);
  return PyUnicode_AsEncodedString(self, "utf-8", "surrogateescape");
}

static PyObject* Key_get_ticket(PyObject* self, void* Py_UNUSED(closure)) {
  return PyLong_FromUnsignedLongLong(((KeyObject*)self)->ticket);
}

static PyObject* Key_get_name(PyObject* self, void* Py_UNUSED(closure)) {
  KeyObject* k = (KeyObject*)self;
  return Py_NewRef(k->name ? k->name : Py_None);
}

static PyGetSetDef Key_getset[] = {
    {"name", Key_get_name, NULL, "the key's stable name in the pool", NULL},
    {"_km_raw", Key_get_raw, NULL, "the secret as the library returned it (bytes)", NULL},
    {"_km_ticket", Key_get_ticket, NULL, "the lease (km_held.ticket; 0: not a lease)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

/* Key._of(held): the Key of a lease acquired through ctypes (a km_held
 * struct, or anything with bytes .secret and .name and an int .ticket), for
 * the cold calls that return one (e.g. an acquire of one chosen key). */
static PyObject* Key_of(PyObject* cls, PyObject* held) {
  PyObject* raw = PyObject_GetAttrString(held, "secret");
  PyObject* name_raw = raw ? PyObject_GetAttrString(held, "name") : NULL;
  PyObject* ticket_obj = name_raw ? PyObject_GetAttrString(held, "ticket") : NULL;
  PyObject *s = NULL, *args = NULL, *name = NULL, *k = NULL;
  if (ticket_obj == NULL) goto done;
  if (!PyBytes_Check(raw) || !PyBytes_Check(name_raw)) {
    PyErr_SetString(PyExc_TypeError, "Key._of(held): held.secret and held.name must be bytes");
    goto done;
  }
  unsigned long long ticket = PyLong_AsUnsignedLongLong(ticket_obj);
  if (ticket == (unsigned long long)-1 && PyErr_Occurred()) goto done;
  s = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), "surrogateescape");
  name = s ? PyUnicode_DecodeUTF8(PyBytes_AS_STRING(name_raw), PyBytes_GET_SIZE(name_raw), "replace") : NULL;
  args = name ? PyTuple_Pack(1, s) : NULL;
  k = args ? PyUnicode_Type.tp_new((PyTypeObject*)cls, args, NULL) : NULL;
  if (k != NULL) {
    KeyObject* key = (KeyObject*)k;
    key->raw = Py_NewRef(raw);
    key->name = Py_NewRef(name);
    key->ticket = (uint64_t)ticket;
  }
done:
  Py_XDECREF(raw);
  Py_XDECREF(name_raw);
  Py_XDECREF(ticket_obj);
  Py_XDECREF(s);
  Py_XDECREF(name);
  Py_XDECREF(args);
  return k;
}

static PyMethodDef Key_methods[] = {
    {"__reduce__", Key_reduce, METH_NOARGS, NULL},
    {"_of", Key_of, METH_O | METH_CLASS, "Key._of(held): the Key of a km_held acquired through ctypes"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject KeyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "keymesh.Key",
    .tp_basicsize = sizeof(KeyObject),
    .tp_dealloc = Key_dealloc,
    .tp_repr = Key_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc =
        "The key string acquire() returns. A plain str (use it anywhere) that also\n"
        "remembers which lease it is, so ending it twice is an error rather than an\n"
        "end of another holder's lease. Its repr is masked.",
    .tp_methods = Key_methods,
    .tp_getset = Key_getset,
};

/* The secret pointer in a Key or a plain str/bytes argument, and its ticket
 * (0: the oldest lease of that secret). *hold keeps the bytes alive. */
static int KeyArg(PyObject* key, const char** secret, uint64_t* ticket, PyObject** hold) {
  *hold = NULL;
  if (Py_IS_TYPE(key, &KeyType) || PyObject_TypeCheck(key, &KeyType)) {
    KeyObject* k = (KeyObject*)key;
    if (k->raw != NULL) {
      *secret = PyBytes_AS_STRING(k->raw);
      *ticket = k->ticket;
      return 0;
    }
  }
  if (PyUnicode_Check(key)) {
    *hold = PyUnicode_AsEncodedString(key, "utf-8", "surrogateescape");
    if (*hold == NULL) return -1;
  } else if (PyBytes_Check(key)) {
    *hold = Py_NewRef(key);
  } else {
    CONFIG_ERROR("key must be a str, not %s", Py_TYPE(key)->tp_name);
    return -1;
  }
  if ((size_t)PyBytes_GET_SIZE(*hold) != strlen(PyBytes_AS_STRING(*hold))) {
    Py_CLEAR(*hold);
    CONFIG_ERROR("key must not contain NUL characters");
    return -1;
  }
  *secret = PyBytes_AS_STRING(*hold);
  *ticket = 0;
  return 0;
}

/* ---- Pool ----------------------------------------------------------------- */

/* What a Key of one pool key is built from, cached by the library's secret
 * pointer (stable until the pool is closed; each hit is still compared). */
typedef struct {
  const char* secret; /* the library's pointer (NULL: empty slot) */
  const char* name;
  PyObject* args; /* (str secret,): the argument tuple of str.__new__ */
  PyObject* raw;  /* bytes secret */
  PyObject* name_str;
} CacheEntry;

typedef struct {
  PyObject_HEAD km_pool* pool;
  unsigned long generation; /* g_fork_generation at the last call */
  CacheEntry* cache;
  size_t cache_cap; /* a power of two */
  size_t cache_used;
} PoolObject;

/* Drops an entry's objects; its pointers stay (the probe chain too). */
static void ClearObjects(CacheEntry* e) {
  Py_CLEAR(e->args);
  Py_CLEAR(e->raw);
  Py_CLEAR(e->name_str);
}

static void ClearCache(PoolObject* p) {
  for (size_t i = 0; i < p->cache_cap; i++) ClearObjects(&p->cache[i]);
  PyMem_Free(p->cache);
  p->cache = NULL;
  p->cache_cap = p->cache_used = 0;
}

static size_t Slot(const char* ptr, size_t cap) {
  uintptr_t h = (uintptr_t)ptr;
  h ^= h >> 17;
  h *= (uintptr_t)0x9E3779B97F4A7C15ull;
  return (size_t)(h >> 7) & (cap - 1);
}

static int GrowCache(PoolObject* p) {
  size_t cap = p->cache_cap ? p->cache_cap * 2 : 64;
  CacheEntry* fresh = PyMem_Calloc(cap, sizeof(CacheEntry));
  if (fresh == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  for (size_t i = 0; i < p->cache_cap; i++) {
    CacheEntry* e = &p->cache[i];
    if (e->secret == NULL) continue;
    size_t j = Slot(e->secret, cap);
    while (fresh[j].secret != NULL) j = (j + 1) & (cap - 1);
    fresh[j] = *e;
  }
  PyMem_Free(p->cache);
  p->cache = fresh;
  p->cache_cap = cap;
  return 0;
}

/* Builds the objects of entry e (whose pointers are set) from held. */
static int FillEntry(CacheEntry* e, const km_held* held) {
  Py_ssize_t n = (Py_ssize_t)strlen(held->secret);
  PyObject* s = PyUnicode_DecodeUTF8(held->secret, n, "surrogateescape");
  if (s == NULL) return -1;
  e->args = PyTuple_Pack(1, s);
  Py_DECREF(s);
  e->raw = PyBytes_FromStringAndSize(held->secret, n);
  e->name_str = PyUnicode_DecodeUTF8(held->name, (Py_ssize_t)strlen(held->name), "replace");
  if (e->args == NULL || e->raw == NULL || e->name_str == NULL) {
    ClearObjects(e);
    return -1;
  }
  return 0;
}

static CacheEntry* Lookup(PoolObject* p, const km_held* held) {
  if (p->cache_cap) {
    for (size_t j = Slot(held->secret, p->cache_cap);; j = (j + 1) & (p->cache_cap - 1)) {
      CacheEntry* e = &p->cache[j];
      if (e->secret == NULL) break;
      if (e->secret != held->secret) continue;
      /* The same pointer should be the same key; compare to be sure. */
      if (e->raw != NULL && e->name == held->name && strcmp(PyBytes_AS_STRING(e->raw), held->secret) == 0) return e;
      ClearObjects(e);
      e->name = held->name;
      return FillEntry(e, held) < 0 ? NULL : e;
    }
  }
  if ((p->cache_used + 1) * 2 > p->cache_cap && GrowCache(p) < 0) return NULL;
  size_t j = Slot(held->secret, p->cache_cap);
  while (p->cache[j].secret != NULL) j = (j + 1) & (p->cache_cap - 1);
  CacheEntry* e = &p->cache[j];
  e->secret = held->secret;
  e->name = held->name;
  p->cache_used++;
  return FillEntry(e, held) < 0 ? NULL : e;
}

static PyObject* MakeKey(PoolObject* p, const km_held* held) {
  CacheEntry* e = Lookup(p, held);
  if (e == NULL) return NULL;
  PyObject* k = PyUnicode_Type.tp_new(&KeyType, e->args, NULL);
  if (k == NULL) return NULL;
  KeyObject* key = (KeyObject*)k;
  key->raw = Py_NewRef(e->raw);
  key->name = Py_NewRef(e->name_str);
  key->ticket = held->ticket;
  return k;
}

static int Pool_init(PyObject* self, PyObject* args, PyObject* kwds) {
  PoolObject* p = (PoolObject*)self;
  PyObject* address;
  static char* kwlist[] = {"address", NULL};
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Pool", kwlist, &address)) return -1;
  if (p->pool != NULL) {
    PyErr_SetString(PyExc_RuntimeError, "keymesh._native.Pool: already initialised");
    return -1;
  }
  void* ptr = PyLong_AsVoidPtr(address);
  if (ptr == NULL) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "keymesh._native.Pool: NULL handle");
    return -1;
  }
  p->pool = (km_pool*)ptr;
  p->generation = g_fork_generation;
  return 0;
}

static void Pool_dealloc(PyObject* self) {
  PoolObject* p = (PoolObject*)self;
  if (p->pool != NULL) {
    km_pool* pool = p->pool;
    p->pool = NULL;
    Py_BEGIN_ALLOW_THREADS km_pool_destroy(pool); /* closes: may wait for calls in progress */
    Py_END_ALLOW_THREADS
  }
  ClearCache(p);
  Py_TYPE(self)->tp_free(self);
}

/* True when this call must release the GIL because it is the pool's first
 * since a fork (the library may reconnect to the broker). */
static inline int AfterFork(PoolObject* p) {
  if (p->generation == g_fork_generation) return 0;
  p->generation = g_fork_generation;
  return 1;
}

static int DoAcquire(PoolObject* p, double timeout, uint64_t tokens, km_cancel* cancel, uint32_t flags,
                     int allow_threads, km_held* held) {
  km_acquire_options o;
  km_acquire_options_init(&o);
  o.flags = flags;
  o.timeout = timeout;
  o.tokens = tokens;
  o.cancel = cancel;
  int rc;
  if (allow_threads) {
    Py_BEGIN_ALLOW_THREADS rc = km_pool_acquire_key_ex(p->pool, &o, held);
    Py_END_ALLOW_THREADS
  } else {
    rc = km_pool_acquire_key_ex(p->pool, &o, held);
  }
  return rc;
}

/* The arguments of a hot call, by position or keyword, into out[0..n)
 * (NULL where not given), as the SyncKeyPool methods these calls stand for
 * take them: SyncKeyPool binds its methods straight to these. */
static int Gather(const char* fn, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, const char* const* names,
                  Py_ssize_t n, Py_ssize_t required, PyObject** out) {
  if (nargs > n) {
    PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments (%zd given)", fn, n, nargs);
    return -1;
  }
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = i < nargs ? args[i] : NULL;
  if (kwnames != NULL) {
    const Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nk; ++k) {
      PyObject* kw = PyTuple_GET_ITEM(kwnames, k);
      Py_ssize_t i = 0;
      while (i < n && PyUnicode_CompareWithASCIIString(kw, names[i]) != 0) ++i;
      if (i == n) {
        PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fn, kw);
        return -1;
      }
      if (out[i] != NULL) {
        PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fn, names[i]);
        return -1;
      }
      out[i] = args[nargs + k];
    }
  }
  for (Py_ssize_t i = 0; i < required; ++i) {
    if (out[i] == NULL) {
      PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fn, names[i]);
      return -1;
    }
  }
  return 0;
}

/* acquire(timeout=None, tokens=0, cancel=None) -> Key. One uncounted
 * attempt with the GIL held; only when it finds no key, the counted acquire
 * that may wait, with the GIL released. */
static PyObject* Pool_acquire(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"timeout", "tokens", "cancel"};
  PoolObject* p = (PoolObject*)self;
  PyObject* a[3];
  if (Gather("acquire", args, nargs, kwnames, names, 3, 0, a) < 0) return NULL;
  double timeout;
  uint64_t tokens;
  if (Seconds(a[0], "timeout", KM_DEFAULT, &timeout) < 0) return NULL;
  if (Tokens(a[1], &tokens) < 0) return NULL;
  km_cancel* cancel = NULL;
  if (a[2] != NULL && a[2] != Py_None) {
    void* c = PyLong_AsVoidPtr(a[2]);
    if (c == NULL && PyErr_Occurred()) return NULL;
    cancel = (km_cancel*)c;
  }
  km_held held;
  int fork = AfterFork(p);
  int rc = DoAcquire(p, KM_DEFAULT, tokens, NULL, KM_ACQUIRE_POLL, fork, &held);
  if (rc != KM_OK) rc = DoAcquire(p, timeout, tokens, cancel, 0, 1, &held);
  if (rc != KM_OK) return RaiseCode(rc, NULL, NULL);
  return MakeKey(p, &held);
}

/* poll(tokens=0) -> Key | None: one uncounted attempt that never waits. */
static PyObject* Pool_poll(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"tokens"};
  PoolObject* p = (PoolObject*)self;
  PyObject* a[1];
  if (Gather("poll", args, nargs, kwnames, names, 1, 0, a) < 0) return NULL;
  uint64_t tokens;
  if (Tokens(a[0], &tokens) < 0) return NULL;
  km_held held;
  int rc = DoAcquire(p, KM_DEFAULT, tokens, NULL, KM_ACQUIRE_POLL, AfterFork(p), &held);
  if (rc == KM_NO_AVAILABLE_KEY) Py_RETURN_NONE;
  if (rc != KM_OK) return RaiseCode(rc, NULL, NULL);
  return MakeKey(p, &held);
}
static PyObject* End(PoolObject* p, PyObject* key, uint32_t outcome, uint32_t flags, double latency, uint64_t tokens,
                     double cooldown) {
  const char* secret;
  uint64_t ticket;
  PyObject* hold;
  if (KeyArg(key, &secret, &ticket, &hold) < 0) return NULL;
  km_end_options o;
  km_end_options_init(&o);
  o.outcome = outcome;
  o.flags = flags;
  o.latency = latency;
  o.tokens = tokens;
  o.cooldown = cooldown;
  int rc;
  if (AfterFork(p)) {
    Py_BEGIN_ALLOW_THREADS rc = km_pool_end_key(p->pool, secret, ticket, &o);
    Py_END_ALLOW_THREADS
  } else {
    rc = km_pool_end_key(p->pool, secret, ticket, &o);
  }
  if (rc != KM_OK) {
    PyObject* raw = hold ? Py_NewRef(hold) : Key_get_raw(key, NULL);
    PyObject* name = PyObject_TypeCheck(key, &KeyType) ? ((KeyObject*)key)->name : NULL;
    RaiseCode(rc, raw, name);
    Py_XDECREF(raw);
    Py_XDECREF(hold);
    return NULL;
  }
  Py_XDECREF(hold);
  Py_RETURN_NONE;
}

/* release(key, latency=None, tokens=0) */
static PyObject* Pool_release(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"key", "latency", "tokens"};
  PyObject* a[3];
  if (Gather("release", args, nargs, kwnames, names, 3, 1, a) < 0) return NULL;
  double latency;
  uint64_t tokens;
  if (Seconds(a[1], "latency", KM_LATENCY_NONE, &latency) < 0) return NULL;
  if (Tokens(a[2], &tokens) < 0) return NULL;
  return End((PoolObject*)self, a[0], KM_OUTCOME_SUCCESS, 0, latency, tokens, KM_DEFAULT);
}

/* mark_failed(key, permanent=False) */
static PyObject* Pool_mark_failed(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"key", "permanent"};
  PyObject* a[2];
  if (Gather("mark_failed", args, nargs, kwnames, names, 2, 1, a) < 0) return NULL;
  int permanent = 0;
  if (a[1] != NULL && (permanent = PyObject_IsTrue(a[1])) < 0) return NULL;
  return End((PoolObject*)self, a[0], KM_OUTCOME_FAILURE, permanent ? KM_END_PERMANENT : 0, KM_LATENCY_NONE, 0,
             KM_DEFAULT);
}

/* mark_rate_limited(key, cooldown=None) */
static PyObject* Pool_mark_rate_limited(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"key", "cooldown"};
  PyObject* a[2];
  if (Gather("mark_rate_limited", args, nargs, kwnames, names, 2, 1, a) < 0) return NULL;
  double cooldown;
  if (Seconds(a[1], "cooldown", KM_DEFAULT, &cooldown) < 0) return NULL;
  return End((PoolObject*)self, a[0], KM_OUTCOME_RATE_LIMITED, 0, KM_LATENCY_NONE, 0, cooldown);
}

/* cancel(key) */
static PyObject* Pool_cancel(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"key"};
  PyObject* a[1];
  if (Gather("cancel", args, nargs, kwnames, names, 1, 1, a) < 0) return NULL;
  return End((PoolObject*)self, a[0], KM_OUTCOME_CANCELLED, 0, KM_LATENCY_NONE, 0, KM_DEFAULT);
}

static PyObject* Pool_get_address(PyObject* self, void* Py_UNUSED(closure)) {
  PoolObject* p = (PoolObject*)self;
  return PyLong_FromVoidPtr(p->pool);
}

static PyMethodDef Pool_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))Pool_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(timeout=None, tokens=0, cancel=None) -> Key"},
    {"poll", (PyCFunction)(void (*)(void))Pool_poll, METH_FASTCALL | METH_KEYWORDS, "poll(tokens=0) -> Key | None"},
    {"release", (PyCFunction)(void (*)(void))Pool_release, METH_FASTCALL | METH_KEYWORDS,
     "release(key, latency=None, tokens=0)"},
    {"mark_failed", (PyCFunction)(void (*)(void))Pool_mark_failed, METH_FASTCALL | METH_KEYWORDS,
     "mark_failed(key, permanent=False)"},
    {"mark_rate_limited", (PyCFunction)(void (*)(void))Pool_mark_rate_limited, METH_FASTCALL | METH_KEYWORDS,
     "mark_rate_limited(key, cooldown=None)"},
    {"cancel", (PyCFunction)(void (*)(void))Pool_cancel, METH_FASTCALL | METH_KEYWORDS, "cancel(key)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Pool_getset[] = {
    {"address", Pool_get_address, NULL, "the km_pool* this object owns, as an int", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "keymesh._native.Pool",
    .tp_basicsize = sizeof(PoolObject),
    .tp_dealloc = Pool_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pool(address): owns the km_pool* at `address` (km_pool_destroy when freed).",
    .tp_methods = Pool_methods,
    .tp_getset = Pool_getset,
    .tp_init = Pool_init,
    .tp_new = PyType_GenericNew,
};

/* ---- Module --------------------------------------------------------------- */

static PyObject* Setup(PyObject* Py_UNUSED(module), PyObject* args) {
  PyObject *factory, *config_error;
  if (!PyArg_ParseTuple(args, "OO:_setup", &factory, &config_error)) return NULL;
  if (!PyCallable_Check(factory) || !PyExceptionClass_Check(config_error)) {
    PyErr_SetString(PyExc_TypeError, "_setup(error_factory, ConfigError)");
    return NULL;
  }
  Py_XSETREF(g_error_factory, Py_NewRef(factory));
  Py_XSETREF(g_config_error, Py_NewRef(config_error));
  Py_RETURN_NONE;
}

static PyObject* LibraryAddress(PyObject* Py_UNUSED(module), PyObject* Py_UNUSED(ignored)) {
  /* The address km_version resolved to for this module: _lib compares it
   * with the ctypes library's, so both are one copy of libkeymesh.so. */
  return PyLong_FromVoidPtr((void*)(uintptr_t)&km_version);
}

static PyMethodDef module_methods[] = {
    {"_setup", Setup, METH_VARARGS, "_setup(error_factory, ConfigError): set once by keymesh._core"},
    {"library_address", LibraryAddress, METH_NOARGS, "the address of km_version in the libkeymesh.so this module uses"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "keymesh._native",
    .m_doc = "KeyMesh's hot path (acquire, poll, the outcome calls, Key) over the C ABI.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
  KeyType.tp_base = &PyUnicode_Type;
  if (PyType_Ready(&KeyType) < 0 || PyType_Ready(&PoolType) < 0) return NULL;
  PyObject* m = PyModule_Create(&native_module);
  if (m == NULL) return NULL;
  if (PyModule_AddObjectRef(m, "Key", (PyObject*)&KeyType) < 0 ||
      PyModule_AddObjectRef(m, "Pool", (PyObject*)&PoolType) < 0 ||
      PyModule_AddIntConstant(m, "MAX_SECONDS", (long)MAX_SECONDS) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  static int atfork_done;
  if (!atfork_done) {
    atfork_done = 1;
    pthread_atfork(NULL, NULL, AfterForkInChild);
  }
  return m;
}
