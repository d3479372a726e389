// Symbol visibility for libkeymesh.so: the library is built with
// -fvisibility=hidden and exports only what is marked KEYMESH_EXPORT.
#ifndef KEYMESH_EXPORT_H_
#define KEYMESH_EXPORT_H_

#if defined(__GNUC__)
#define KEYMESH_EXPORT __attribute__((visibility("default")))
#else
#define KEYMESH_EXPORT
#endif

#endif  // KEYMESH_EXPORT_H_
