#!/usr/bin/python3
"""Fails when tests/client/c_api_test.c does not call every function of the C ABI.

    check_c_api_coverage.py [keymesh.h [c_api_test.c]]

Lists every KEYMESH_EXPORT function declared in include/keymesh/keymesh.h and
looks for a call of each (its name followed by '(') in the C test, comments
left out. Run by CTest as c_api_coverage_test.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

EXPORTED = re.compile(r"\bKEYMESH_EXPORT\b[^;{]*?\b(km_\w+)\s*\(", re.S)
COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def exported(header_text):
    return sorted(set(EXPORTED.findall(COMMENT.sub(" ", header_text))))


def called(test_text, names):
    code = COMMENT.sub(" ", test_text)
    return {n for n in names if re.search(r"\b" + re.escape(n) + r"\s*\(", code)}


def main(argv):
    header = pathlib.Path(argv[1]) if len(argv) > 1 else ROOT / "include" / "keymesh" / "keymesh.h"
    test = pathlib.Path(argv[2]) if len(argv) > 2 else ROOT / "tests" / "client" / "c_api_test.c"
    names = exported(header.read_text())
    if not names:
        print(f"check_c_api_coverage: no KEYMESH_EXPORT function found in {header}")
        return 1
    missing = [n for n in names if n not in called(test.read_text(), names)]
    for n in missing:
        print(f"{test.name}: never calls {n} (declared in {header.name})")
    if missing:
        print(f"check_c_api_coverage: {len(missing)} of {len(names)} C ABI functions are not called")
        return 1
    print(f"check_c_api_coverage: {test.name} calls all {len(names)} C ABI functions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
