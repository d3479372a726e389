// Quoting input into messages and log lines.
//
// Every error message and log line that repeats something another process
// or the operator wrote (a config field name, a protocol field, a key or
// pool name, a path, a command-line argument) passes it through one of
// these, so a message is always exactly one line and a control character in
// the input is visible instead of acting on the terminal or the log.
#ifndef KEYMESH_COMMON_TEXT_H_
#define KEYMESH_COMMON_TEXT_H_

#include <string>
#include <string_view>

namespace keymesh {

// Appends `text` to *out with '\\' and `quote` (if not '\0') backslash-escaped
// and control characters (bytes < 0x20 and 0x7f) written as \n, \t, \r or
// \xHH. Bytes >= 0x80 are copied as they are (UTF-8 stays readable).
void AppendEscaped(std::string* out, std::string_view text, char quote = '\0');

// `text` escaped as above, without quotes (for dotted field paths).
std::string Escaped(std::string_view text);

// `text` escaped and in single quotes: Quoted("a\nb") == "'a\\nb'".
std::string Quoted(std::string_view text);

// `text` with only its control characters escaped (backslashes kept as they
// are): for a message that is already text, e.g. an error a peer sent.
std::string OneLine(std::string_view text);

// True when `text` holds a control character (what Escaped() rewrites).
bool HasControl(std::string_view text) noexcept;

// `bytes` as lower-case hex, two digits per byte.
std::string Hex(std::string_view bytes);

}  // namespace keymesh

#endif  // KEYMESH_COMMON_TEXT_H_
