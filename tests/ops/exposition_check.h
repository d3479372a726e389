// A strict checker of the Prometheus text exposition format (0.0.4), for
// the ops tests: it parses what keymesh-broker renders and rejects anything
// a scraper could misread.
//
// Checked: every sample belongs to a family declared by one `# TYPE` line
// (and at most one `# HELP`), before its samples, with its samples
// contiguous; metric and label names match the format's grammar; label
// values are quoted with only \\, \" and \n escapes; values are numbers
// (or +Inf, -Inf, NaN); no series appears twice; counters end in _total and
// are >= 0; a histogram has, per label set, _bucket samples with `le`
// strictly ascending ending at +Inf, cumulative (non-decreasing) counts,
// then _sum and _count with the +Inf bucket equal to _count; the text ends
// with a newline.
#ifndef KEYMESH_TESTS_OPS_EXPOSITION_CHECK_H_
#define KEYMESH_TESTS_OPS_EXPOSITION_CHECK_H_

#include <map>
#include <string>
#include <vector>

namespace keymesh::testing {

struct Sample {
  std::string name;                           // full sample name (with _bucket, ...)
  std::map<std::string, std::string> labels;  // unescaped values
  double value = 0;
};

struct Exposition {
  std::map<std::string, std::string> types;  // family -> counter|gauge|histogram|...
  std::vector<Sample> samples;

  // The value of the one sample with this name and exactly these labels;
  // NaN if absent.
  double Get(const std::string& name, const std::map<std::string, std::string>& labels) const;
  // Sum over the samples with this name whose labels include `match`.
  double Sum(const std::string& name, const std::map<std::string, std::string>& match = {}) const;
  size_t Count(const std::string& name) const;
};

// Parses and checks `text`. On failure returns false and sets *error to
// "line N: what is wrong".
bool ParseExposition(const std::string& text, Exposition* out, std::string* error);

}  // namespace keymesh::testing

#endif  // KEYMESH_TESTS_OPS_EXPOSITION_CHECK_H_
