// Replays every input that once crashed a fuzz target
// (tests/fuzz/regressions/<target>/*) and the seed corpus
// (tests/fuzz/corpus/<target>/*) through the fuzz entry points, in the
// normal, ASan and TSan builds. A crash found by scripts/fuzz is fixed, then
// its input is copied into regressions/<target>/ so it stays fixed.
#define BOOST_TEST_MODULE fuzz_regression_test
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "fuzz_entries.h"

namespace {

using Entry = void (*)(const uint8_t*, size_t);

size_t ReplayDir(const std::string& dir, Entry entry) {
  size_t n = 0;
  if (!std::filesystem::is_directory(dir)) return 0;
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.is_regular_file()) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    BOOST_TEST_CONTEXT("input " << f.string()) { entry(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()); }
    ++n;
  }
  return n;
}

void Replay(const std::string& target, Entry entry) {
  const std::string root = KEYMESH_FUZZ_SOURCE_DIR;
  const size_t reg = ReplayDir(root + "/regressions/" + target, entry);
  const size_t seeds = ReplayDir(root + "/corpus/" + target, entry);
  BOOST_TEST_MESSAGE(target << ": " << reg << " regressions, " << seeds << " seeds replayed");
  BOOST_CHECK_GT(seeds, 0u);
}

}  // namespace

BOOST_AUTO_TEST_CASE(protocol_inputs) { Replay("protocol", keymesh::fuzz::ProtocolInput); }
BOOST_AUTO_TEST_CASE(config_inputs) { Replay("config", keymesh::fuzz::ConfigInput); }
BOOST_AUTO_TEST_CASE(state_inputs) { Replay("state", keymesh::fuzz::StateInput); }
BOOST_AUTO_TEST_CASE(segment_inputs) { Replay("segment", keymesh::fuzz::SegmentInput); }
BOOST_AUTO_TEST_CASE(redis_inputs) { Replay("redis", keymesh::fuzz::RedisInput); }
