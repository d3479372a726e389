#include "common/text.h"

namespace keymesh {
namespace {

constexpr bool IsControl(unsigned char c) noexcept { return c < 0x20 || c == 0x7f; }

void Escape(std::string* out, std::string_view text, char quote, bool backslash) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if ((backslash && c == '\\') || (quote != '\0' && c == quote)) {
      out->push_back('\\');
      out->push_back(c);
    } else if (c == '\n') {
      out->append("\\n");
    } else if (c == '\t') {
      out->append("\\t");
    } else if (c == '\r') {
      out->append("\\r");
    } else if (IsControl(u)) {
      out->append("\\x");
      out->push_back(kHex[u >> 4]);
      out->push_back(kHex[u & 15]);
    } else {
      out->push_back(c);
    }
  }
}

}  // namespace

void AppendEscaped(std::string* out, std::string_view text, char quote) { Escape(out, text, quote, true); }

std::string OneLine(std::string_view text) {
  if (!HasControl(text)) return std::string(text);
  std::string out;
  Escape(&out, text, '\0', false);
  return out;
}

std::string Escaped(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  AppendEscaped(&out, text);
  return out;
}

std::string Quoted(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 2);
  out.push_back('\'');
  AppendEscaped(&out, text, '\'');
  out.push_back('\'');
  return out;
}

bool HasControl(std::string_view text) noexcept {
  for (char c : text) {
    if (IsControl(static_cast<unsigned char>(c))) return true;
  }
  return false;
}

std::string Hex(std::string_view bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) {
    const auto u = static_cast<unsigned char>(c);
    out.push_back(kHex[u >> 4]);
    out.push_back(kHex[u & 15]);
  }
  return out;
}

}  // namespace keymesh
