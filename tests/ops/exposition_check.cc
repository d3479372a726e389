#include "exposition_check.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <set>
#include <sstream>

namespace keymesh::testing {
namespace {

bool IsNameStart(char c, bool colon) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':');
}
bool IsNameChar(char c, bool colon) { return IsNameStart(c, colon) || (c >= '0' && c <= '9'); }

bool ValidName(const std::string& s, bool colon) {
  if (s.empty() || !IsNameStart(s[0], colon)) return false;
  for (char c : s) {
    if (!IsNameChar(c, colon)) return false;
  }
  return true;
}

bool ParseValue(const std::string& s, double* v) {
  if (s == "+Inf" || s == "Inf") {
    *v = std::numeric_limits<double>::infinity();
    return true;
  }
  if (s == "-Inf") {
    *v = -std::numeric_limits<double>::infinity();
    return true;
  }
  if (s == "NaN") {
    *v = std::numeric_limits<double>::quiet_NaN();
    return true;
  }
  if (s.empty()) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || c == '.' || c == '-' || c == '+' || c == 'e' || c == 'E')) return false;
  }
  char* end = nullptr;
  *v = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size() && std::isfinite(*v);
}

std::string SeriesKey(const std::string& name, const std::map<std::string, std::string>& labels) {
  std::string k = name + "{";
  for (const auto& [n, v] : labels) k += n + "=\"" + v + "\",";
  return k + "}";
}

// The family a sample name belongs to, given the declared types.
std::string FamilyOf(const std::string& name, const std::map<std::string, std::string>& types) {
  if (types.count(name) != 0) return name;
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    const std::string sfx = suffix;
    if (name.size() > sfx.size() && name.compare(name.size() - sfx.size(), sfx.size(), sfx) == 0) {
      const std::string base = name.substr(0, name.size() - sfx.size());
      auto it = types.find(base);
      if (it != types.end() && (it->second == "histogram" || (it->second == "summary" && sfx != "_bucket")))
        return base;
    }
  }
  return "";
}

}  // namespace

double Exposition::Get(const std::string& name, const std::map<std::string, std::string>& labels) const {
  for (const Sample& s : samples) {
    if (s.name == name && s.labels == labels) return s.value;
  }
  return std::numeric_limits<double>::quiet_NaN();
}

double Exposition::Sum(const std::string& name, const std::map<std::string, std::string>& match) const {
  double sum = 0;
  for (const Sample& s : samples) {
    if (s.name != name) continue;
    bool ok = true;
    for (const auto& [k, v] : match) {
      auto it = s.labels.find(k);
      ok = ok && it != s.labels.end() && it->second == v;
    }
    if (ok) sum += s.value;
  }
  return sum;
}

size_t Exposition::Count(const std::string& name) const {
  size_t n = 0;
  for (const Sample& s : samples) n += s.name == name ? 1 : 0;
  return n;
}

bool ParseExposition(const std::string& text, Exposition* out, std::string* error) {
  *out = Exposition();
  int line_no = 0;
  auto fail = [&](const std::string& what) {
    *error = "line " + std::to_string(line_no) + ": " + what;
    return false;
  };
  if (text.empty()) return fail("empty exposition");
  if (text.back() != '\n') return fail("the text does not end with a newline");
  std::set<std::string> helped, series, finished_families;
  std::string current_family;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (line.empty()) continue;
    if (line[0] == '#') {
      std::istringstream in(line);
      std::string hash, kind, name;
      in >> hash >> kind >> name;
      if (hash != "#") return fail("a comment must start with '# '");
      if (kind != "HELP" && kind != "TYPE") continue;  // other comments are allowed
      if (!ValidName(name, true)) return fail("bad metric name '" + name + "' in " + kind);
      if (line.compare(0, 7 + name.size(), "# " + kind + " " + name) != 0) return fail("malformed " + kind + " line");
      const std::string rest = line.size() > 7 + name.size() ? line.substr(7 + name.size()) : "";
      if (kind == "HELP") {
        if (!helped.insert(name).second) return fail("second HELP for " + name);
        if (rest.empty() || rest[0] != ' ') return fail("HELP without text for " + name);
        for (size_t i = 1; i < rest.size(); ++i) {
          if (rest[i] == '\\' && (i + 1 >= rest.size() || (rest[i + 1] != '\\' && rest[i + 1] != 'n'))) {
            return fail("bad escape in HELP of " + name);
          }
          if (rest[i] == '\\') ++i;
        }
      } else {
        if (out->types.count(name) != 0) return fail("second TYPE for " + name);
        const std::string type = rest.size() > 1 ? rest.substr(1) : "";
        if (type != "counter" && type != "gauge" && type != "histogram" && type != "summary" && type != "untyped") {
          return fail("unknown type '" + type + "' for " + name);
        }
        for (const Sample& s : out->samples) {
          if (FamilyOf(s.name, {{name, type}}) == name) return fail("TYPE of " + name + " after its samples");
        }
        out->types[name] = type;
      }
      continue;
    }
    // name{labels} value [timestamp]
    size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    Sample s;
    s.name = line.substr(0, i);
    if (!ValidName(s.name, true)) return fail("bad metric name '" + s.name + "'");
    if (i < line.size() && line[i] == '{') {
      ++i;
      for (;;) {
        if (i < line.size() && line[i] == '}') {
          ++i;
          break;
        }
        size_t eq = line.find('=', i);
        if (eq == std::string::npos) return fail("label without '='");
        const std::string lname = line.substr(i, eq - i);
        if (!ValidName(lname, false) || lname.rfind("__", 0) == 0) return fail("bad label name '" + lname + "'");
        i = eq + 1;
        if (i >= line.size() || line[i] != '"') return fail("label value of " + lname + " is not quoted");
        ++i;
        std::string value;
        bool closed = false;
        while (i < line.size()) {
          const char c = line[i++];
          if (c == '"') {
            closed = true;
            break;
          }
          if (c == '\\') {
            if (i >= line.size()) return fail("dangling escape");
            const char e = line[i++];
            if (e == '\\')
              value += '\\';
            else if (e == '"')
              value += '"';
            else if (e == 'n')
              value += '\n';
            else
              return fail(std::string("bad escape \\") + e + " in label " + lname);
          } else {
            value += c;
          }
        }
        if (!closed) return fail("unterminated label value");
        if (!s.labels.emplace(lname, value).second) return fail("label " + lname + " twice");
        if (i < line.size() && line[i] == ',') {
          ++i;
          continue;
        }
        if (i < line.size() && line[i] == '}') continue;
        return fail("expected ',' or '}' after label " + lname);
      }
    }
    if (i >= line.size() || line[i] != ' ') return fail("expected a space before the value");
    ++i;
    std::string value_text = line.substr(i);
    const size_t sp = value_text.find(' ');
    if (sp != std::string::npos) {
      const std::string ts = value_text.substr(sp + 1);
      value_text = value_text.substr(0, sp);
      if (ts.empty() || ts.find_first_not_of("-0123456789") != std::string::npos) return fail("bad timestamp");
    }
    if (!ParseValue(value_text, &s.value)) return fail("bad value '" + value_text + "'");
    const std::string family = FamilyOf(s.name, out->types);
    if (family.empty()) return fail("sample " + s.name + " has no TYPE");
    if (family != current_family) {
      if (finished_families.count(family) != 0) return fail("samples of " + family + " are not contiguous");
      if (!current_family.empty()) finished_families.insert(current_family);
      current_family = family;
    }
    if (!series.insert(SeriesKey(s.name, s.labels)).second)
      return fail("duplicate series " + SeriesKey(s.name, s.labels));
    const std::string& type = out->types[family];
    if (type == "counter") {
      if (s.name.size() < 6 || s.name.compare(s.name.size() - 6, 6, "_total") != 0) {
        return fail("counter " + s.name + " does not end in _total");
      }
      if (!(s.value >= 0)) return fail("counter " + s.name + " is negative or NaN");
    }
    if (type == "histogram") {
      const bool bucket = s.name == family + "_bucket";
      if (bucket != (s.labels.count("le") != 0)) return fail("le label on a non-bucket or missing on a bucket");
    }
    out->samples.push_back(std::move(s));
  }
  // Histogram structure, per family and label set (without le).
  for (const auto& [family, type] : out->types) {
    if (type != "histogram") continue;
    struct Group {
      std::vector<std::pair<double, double>> buckets;  // (le, count) in order of appearance
      double sum = std::numeric_limits<double>::quiet_NaN();
      double count = std::numeric_limits<double>::quiet_NaN();
    };
    std::map<std::string, Group> groups;
    for (const Sample& s : out->samples) {
      if (FamilyOf(s.name, out->types) != family) continue;
      std::map<std::string, std::string> rest = s.labels;
      rest.erase("le");
      Group& g = groups[SeriesKey("", rest)];
      if (s.name == family + "_bucket") {
        double le = 0;
        if (!ParseValue(s.labels.at("le"), &le) || std::isnan(le)) {
          *error = family + ": bad le '" + s.labels.at("le") + "'";
          return false;
        }
        if (!g.buckets.empty() && !(le > g.buckets.back().first)) {
          *error = family + ": le not strictly ascending";
          return false;
        }
        if (!g.buckets.empty() && s.value < g.buckets.back().second) {
          *error = family + ": bucket counts are not cumulative";
          return false;
        }
        if (!std::isnan(g.count)) {
          *error = family + ": a bucket after _count";
          return false;
        }
        g.buckets.emplace_back(le, s.value);
      } else if (s.name == family + "_sum") {
        g.sum = s.value;
      } else if (s.name == family + "_count") {
        g.count = s.value;
      } else {
        *error = family + ": unexpected sample " + s.name;
        return false;
      }
    }
    for (const auto& [labels, g] : groups) {
      const std::string where = family + labels;
      if (g.buckets.empty() || !std::isinf(g.buckets.back().first)) {
        *error = where + ": no +Inf bucket";
        return false;
      }
      if (std::isnan(g.sum) || std::isnan(g.count)) {
        *error = where + ": _sum or _count missing";
        return false;
      }
      if (g.buckets.back().second != g.count) {
        *error = where + ": +Inf bucket != _count";
        return false;
      }
    }
  }
  return true;
}

}  // namespace keymesh::testing
