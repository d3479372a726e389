// The shared library's own translation unit (the rest is keymesh_client,
// linked whole): the version string, for diagnostics.
#include "keymesh/export.h"

extern "C" KEYMESH_EXPORT const char* keymesh_version_string(void) { return KEYMESH_VERSION_STRING; }
