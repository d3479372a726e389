// The eligibility index (shm/eligibility_index.h) on its own: random adds,
// removes and key changes against a plain model, in both the scan mode (few
// slots) and the tree mode, and the serial order of wrapped passes.
#define BOOST_TEST_MODULE eligibility_index_test
#include "shm/eligibility_index.h"

#include <map>
#include <optional>
#include <random>
#include <vector>

#include <boost/test/unit_test.hpp>

namespace {

using keymesh::shm::EligibilityIndex;
using keymesh::shm::SortKey;

struct Arrays {
  std::vector<uint64_t> bits;
  std::vector<SortKey> order;
  std::vector<uint32_t> tree;
  uint32_t eligible = 0;
  uint32_t leaves = 0;
  explicit Arrays(uint32_t capacity)
      : bits((capacity + 63) / 64), order(capacity), tree(EligibilityIndex::TreeNodes(capacity)) {}
  EligibilityIndex Index(uint32_t capacity) {
    return EligibilityIndex(EligibilityIndex::Arrays{bits.data(), order.data(), tree.data(), &eligible, &leaves},
                            capacity);
  }
};

// The minimum by (k1 as a serial number, k2, slot), as the index defines it.
std::optional<uint32_t> ModelMin(const std::map<uint32_t, SortKey>& model) {
  std::optional<uint32_t> best;
  for (const auto& [slot, k] : model) {
    if (!best) {
      best = slot;
      continue;
    }
    const SortKey& b = model.at(*best);
    const int64_t d = static_cast<int64_t>(k.k1 - b.k1);
    if (d < 0 || (d == 0 && k.k2 < b.k2)) best = slot;
  }
  return best;
}

void RandomOps(uint32_t capacity, uint32_t high_water, uint32_t seed) {
  Arrays arrays(capacity);
  EligibilityIndex index = arrays.Index(capacity);
  index.Clear(true, high_water);
  std::map<uint32_t, SortKey> model;
  std::mt19937 rng(seed);
  for (int op = 0; op < 20000; ++op) {
    const uint32_t slot = rng() % high_water;
    const SortKey key{rng() % 5, rng() % 1000};
    const bool in = model.count(slot) != 0;
    switch (rng() % 3) {
      case 0:
        if (!in) {
          index.Add(slot, true, key);
          model[slot] = key;
        }
        break;
      case 1:
        if (in) {
          index.Remove(slot, true);
          model.erase(slot);
        }
        break;
      default:
        if (in) {
          index.Update(slot, key);
          model[slot] = key;
        }
        break;
    }
    BOOST_REQUIRE_EQUAL(index.eligible_count(), model.size());
    BOOST_REQUIRE(index.Min() == ModelMin(model));
    if (op % 97 == 0) BOOST_REQUIRE(index.Valid(true));
  }
  BOOST_CHECK(index.Valid(true));
}

}  // namespace

BOOST_AUTO_TEST_CASE(scan_mode_matches_the_model) { RandomOps(1024, 8, 1); }
BOOST_AUTO_TEST_CASE(scan_mode_at_its_limit) { RandomOps(16, EligibilityIndex::kScanLeaves, 2); }
BOOST_AUTO_TEST_CASE(tree_mode_matches_the_model) { RandomOps(1024, 100, 3); }
BOOST_AUTO_TEST_CASE(tree_mode_of_a_capacity_that_is_not_a_power_of_two) { RandomOps(1000, 1000, 4); }

BOOST_AUTO_TEST_CASE(ties_go_to_the_lowest_slot) {
  for (uint32_t high_water : {8u, 200u}) {
    Arrays arrays(256);
    EligibilityIndex index = arrays.Index(256);
    index.Clear(true, high_water);
    index.Add(5, true, SortKey{1, 7});
    index.Add(3, true, SortKey{1, 7});
    index.Add(6, true, SortKey{1, 7});
    BOOST_CHECK(index.Min() == std::optional<uint32_t>(3));
    index.Remove(3, true);
    BOOST_CHECK(index.Min() == std::optional<uint32_t>(5));
  }
}

BOOST_AUTO_TEST_CASE(passes_compare_as_serial_numbers_across_the_wrap) {
  for (uint32_t high_water : {8u, 200u}) {
    Arrays arrays(256);
    EligibilityIndex index = arrays.Index(256);
    index.Clear(true, high_water);
    // Slot 1's pass wrapped around 2^64: it is one stride after slot 0's.
    index.Add(0, true, SortKey{UINT64_MAX - 10, 0});
    index.Add(1, true, SortKey{5, 0});
    BOOST_CHECK(index.Min() == std::optional<uint32_t>(0));
    index.Update(0, SortKey{20, 0});  // slot 0 wrapped too, and is now after slot 1
    BOOST_CHECK(index.Min() == std::optional<uint32_t>(1));
  }
}

BOOST_AUTO_TEST_CASE(round_robin_order_is_the_bitset) {
  Arrays arrays(256);
  EligibilityIndex index = arrays.Index(256);
  index.Clear(false, 200);
  for (uint32_t s : {3u, 70u, 150u}) index.Add(s, false, SortKey{});
  BOOST_CHECK(index.NextFrom(0, 200) == std::optional<uint32_t>(3));
  BOOST_CHECK(index.NextFrom(4, 200) == std::optional<uint32_t>(70));
  BOOST_CHECK(index.NextFrom(151, 200) == std::optional<uint32_t>(3));  // wraps
  BOOST_CHECK(index.Valid(false));
  index.Remove(70, false);
  BOOST_CHECK(index.NextFrom(4, 200) == std::optional<uint32_t>(150));
  BOOST_CHECK_EQUAL(index.eligible_count(), 2u);
}
