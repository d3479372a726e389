// KM-05: no process can stop the broker. A real process maps the broker's
// segment, takes one pool's lock and stops itself (SIGSTOP) inside the
// critical section; the broker keeps serving the other pool, answers the
// stuck one with `busy` naming the holder, and still exits on SIGTERM.
#define BOOST_TEST_MODULE stuck_pool_test
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include <boost/json.hpp>
#include <boost/test/unit_test.hpp>

#include "shm/pool.h"
#include "shm/segment.h"
#include "support/broker_harness.h"
#include "support/process.h"

namespace km = keymesh;
namespace kt = keymesh::testing;

namespace {

constexpr const char* kPools = R"({"a":{"keys":[{"name":"a1","secret":"sk-test-aaaaaaaaaaaa1111"}]},)"
                               R"("b":{"keys":[{"name":"b1","secret":"sk-test-bbbbbbbbbbbb2222"}]}})";

// A child that takes pool `pool`'s lock in `segment` and stops itself
// there, as a worker preempted (or SIGSTOPped, or frozen) in a critical
// section would. Returns once it is stopped.
pid_t StopInsideThePoolLock(const std::string& segment, const std::string& pool) {
  const pid_t child = kt::ForkChild([&] {
    km::Result<std::unique_ptr<km::shm::Segment>> seg = km::shm::Segment::Open(segment);
    if (!seg.ok()) return 10;
    for (uint32_t i = 0; i < (*seg)->capacities().max_pools; ++i) {
      if ((*seg)->pool_header(i)->use != km::shm::PoolUse::kInUse) continue;
      if (km::shm::PoolUser(**seg, i).Info().name != pool) continue;
      (void)(*seg)->pool_header(i)->mutex.Lock();
      ::raise(SIGSTOP);
      return 0;  // never unlocks: SIGKILLed by the test
    }
    return 11;
  });
  int status = 0;
  BOOST_REQUIRE_EQUAL(::waitpid(child, &status, WUNTRACED), child);
  BOOST_REQUIRE_MESSAGE(WIFSTOPPED(status), "the lock holder did not stop (exit " << WEXITSTATUS(status) << ")");
  return child;
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

std::string ErrorCode(const std::optional<boost::json::object>& r) {
  if (!r || !r->contains("error")) return "";
  return std::string(r->at("error").as_object().at("code").as_string());
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_stopped_lock_holder_stops_only_its_pool) {
  kt::BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  kt::ChildGuard holder{StopInsideThePoolLock(b.segment(), "a")};

  kt::RawClient c(b.socket());
  BOOST_REQUIRE(c.connected());
  // The other pool is served at once.
  auto t0 = std::chrono::steady_clock::now();
  std::optional<boost::json::object> r = c.Call("status", {{"pool", "b"}});
  BOOST_REQUIRE(r);
  BOOST_CHECK_MESSAGE(r->at("ok").as_bool(), boost::json::serialize(*r));
  BOOST_CHECK_LT(Seconds(t0), 0.1);
  // The stuck pool answers busy within the bound, naming the holder.
  t0 = std::chrono::steady_clock::now();
  r = c.Call("status", {{"pool", "a"}});
  BOOST_CHECK_LT(Seconds(t0), 0.5);
  BOOST_REQUIRE(r);
  BOOST_CHECK_EQUAL(ErrorCode(r), "busy");
  const std::string message = std::string(r->at("error").as_object().at("message").as_string());
  BOOST_CHECK_MESSAGE(message.find("pid " + std::to_string(holder.pid)) != std::string::npos, message);
  // The status of every pool: b's table, and a reported busy.
  r = c.Call("status");
  BOOST_REQUIRE(r);
  BOOST_REQUIRE(r->at("ok").as_bool());
  BOOST_CHECK_EQUAL(r->at("pools").as_array().size(), 1u);
  BOOST_REQUIRE(r->contains("busy"));
  BOOST_CHECK_EQUAL(r->at("busy").as_array().size(), 1u);
  // The broker logs it, and its ticks (reaping, persistence) go on.
  BOOST_CHECK(b.WaitLog("event=pool_busy pool=a", 5));
  // SIGTERM: out within 2 s, state saved (a's last saved state kept).
  t0 = std::chrono::steady_clock::now();
  b.Signal(SIGTERM);
  const std::optional<int> code = b.WaitExit(2.0);
  BOOST_REQUIRE_MESSAGE(code.has_value(), "the broker did not exit within 2 s of SIGTERM");
  BOOST_CHECK_EQUAL(*code, 0);
  BOOST_CHECK_LT(Seconds(t0), 2.0);
}

BOOST_AUTO_TEST_CASE(once_the_holder_is_gone_the_pool_is_served_again) {
  kt::BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  kt::ChildGuard holder{StopInsideThePoolLock(b.segment(), "a")};
  kt::RawClient c(b.socket());
  BOOST_REQUIRE_EQUAL(ErrorCode(c.Call("status", {{"pool", "a"}})), "busy");
  BOOST_CHECK_EQUAL(holder.KillAndWait(), 128 + SIGKILL);
  // The next locker sees the holder dead, repairs the pool and serves it.
  std::optional<boost::json::object> r = c.Call("status", {{"pool", "a"}});
  BOOST_REQUIRE(r);
  BOOST_CHECK_MESSAGE(r->at("ok").as_bool(), boost::json::serialize(*r));
}
