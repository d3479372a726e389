// The C ABI (include/keymesh/keymesh.h): implemented with the Python package.
