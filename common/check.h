// A broken invariant is a bug: report file and line, then abort. Never used
// for conditions a caller can cause (those are Status errors).
#ifndef KEYMESH_COMMON_CHECK_H_
#define KEYMESH_COMMON_CHECK_H_

#include <cstdio>
#include <cstdlib>

#define KM_CHECK_MSG(cond, msg)                                                                              \
  do {                                                                                                       \
    if (!(cond)) [[unlikely]] {                                                                              \
      std::fprintf(stderr, "keymesh: invariant failed at %s:%d: %s (%s)\n", __FILE__, __LINE__, #cond, msg); \
      std::abort();                                                                                          \
    }                                                                                                        \
  } while (0)

#define KM_CHECK(cond) KM_CHECK_MSG(cond, "bug")

#endif  // KEYMESH_COMMON_CHECK_H_
