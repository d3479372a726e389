// The GCRA budgets (shm/rate_budget.h) as pure functions, without a pool.
#define BOOST_TEST_MODULE rate_budget_test
#include "shm/rate_budget.h"

#include <boost/test/unit_test.hpp>

#include "shm/clock.h"

namespace {

using keymesh::shm::KeyConfig;
using keymesh::shm::kNanosPerSecond;
using keymesh::shm::SlotState;

KeyConfig Config(uint32_t rpm, uint64_t tpm = 0, uint32_t burst = 0) {
  KeyConfig c{};
  c.rpm = rpm;
  c.tpm = tpm;
  c.burst = burst;
  return c;
}

}  // namespace

BOOST_AUTO_TEST_CASE(request_pacing_is_the_limit_less_the_margin) {
  const auto p = keymesh::shm::RequestPacingOf(Config(600), 0);  // 10/s
  BOOST_CHECK_EQUAL(p.interval, 100'000'000u);
  BOOST_CHECK_EQUAL(p.tolerance, 0u);
  const auto m = keymesh::shm::RequestPacingOf(Config(600), 20000);  // 2 % margin: 9.8/s
  BOOST_CHECK_EQUAL(m.interval, 102'040'816u);
  const auto b = keymesh::shm::RequestPacingOf(Config(600, 0, 5), 0);
  BOOST_CHECK_EQUAL(b.tolerance, 4 * b.interval);  // five back to back
  BOOST_CHECK(!keymesh::shm::RequestPacingOf(Config(0), 0).limited());
}

BOOST_AUTO_TEST_CASE(grants_are_spaced_by_the_interval) {
  const KeyConfig c = Config(600);
  const auto p = keymesh::shm::RequestPacingOf(c, 0);
  SlotState st{};
  const uint64_t t0 = 1000 * kNanosPerSecond;
  BOOST_CHECK_EQUAL(keymesh::shm::ReadyAt(st, c, 0), 0u);
  st.req_tat = keymesh::shm::AfterRequest(st.req_tat, p, t0);
  BOOST_CHECK_EQUAL(st.req_tat, t0 + p.interval);
  BOOST_CHECK_EQUAL(keymesh::shm::ReadyAt(st, c, 0), t0 + p.interval);  // the next one waits
  BOOST_CHECK_EQUAL(keymesh::shm::RequestsAvailable(st.req_tat, p, t0), 0);
  BOOST_CHECK_EQUAL(keymesh::shm::RequestsAvailable(st.req_tat, p, t0 + p.interval), 1);
  st.cooldown_deadline = t0 + 5 * kNanosPerSecond;  // a cooldown later than the budget wins
  BOOST_CHECK_EQUAL(keymesh::shm::ReadyAt(st, c, 0), st.cooldown_deadline);
}

BOOST_AUTO_TEST_CASE(tokens_are_debited_and_refunded) {
  const KeyConfig c = Config(0, 60000);  // 1000 tokens/s
  const auto p = keymesh::shm::TokenPacingOf(c, 0);
  BOOST_CHECK_CLOSE(p.per_token, 1e6, 1e-9);
  const uint64_t t0 = 1000 * kNanosPerSecond;
  const uint64_t reserved = keymesh::shm::AfterTokens(0, p, t0, 500);
  BOOST_CHECK_EQUAL(reserved, t0 + 500'000'000u);
  BOOST_CHECK_EQUAL(keymesh::shm::CorrectTokens(reserved, p, t0, 500, 200), t0 + 200'000'000u);
  BOOST_CHECK_EQUAL(keymesh::shm::CorrectTokens(reserved, p, t0, 500, 800), t0 + 800'000'000u);
  BOOST_CHECK_EQUAL(keymesh::shm::TokensAvailable(t0, p, t0), 1000);  // one second of tolerance
}

BOOST_AUTO_TEST_CASE(provider_reports_only_ever_tighten) {
  const KeyConfig c = Config(600);
  const auto rp = keymesh::shm::RequestPacingOf(c, 0);
  const auto tp = keymesh::shm::TokenPacingOf(c, 0);
  const uint64_t now = 1000 * kNanosPerSecond;
  keymesh::shm::LimitUpdate out_of_requests;
  out_of_requests.remaining_requests = 0;
  out_of_requests.reset_requests = 2.0;
  keymesh::shm::Budgets b = keymesh::shm::ApplyLimitUpdate({0, 0, 0}, rp, tp, out_of_requests, now);
  BOOST_CHECK_EQUAL(b.req_tat, now + 2 * kNanosPerSecond);
  // A later, laxer report does not move it back.
  keymesh::shm::LimitUpdate lax;
  lax.remaining_requests = 100;
  BOOST_CHECK_EQUAL(keymesh::shm::ApplyLimitUpdate(b, rp, tp, lax, now).req_tat, b.req_tat);
  // Retry-After is a cooldown; a shorter one never shortens it.
  keymesh::shm::LimitUpdate retry;
  retry.retry_after = 30.0;
  b = keymesh::shm::ApplyLimitUpdate(b, rp, tp, retry, now);
  BOOST_CHECK_EQUAL(b.cooldown_deadline, now + 30 * kNanosPerSecond);
  retry.retry_after = 1.0;
  BOOST_CHECK_EQUAL(keymesh::shm::ApplyLimitUpdate(b, rp, tp, retry, now).cooldown_deadline, b.cooldown_deadline);
  // No request limit configured: an exhausted report becomes a cooldown.
  const KeyConfig unlimited = Config(0);
  b = keymesh::shm::ApplyLimitUpdate({0, 0, 0}, keymesh::shm::RequestPacingOf(unlimited, 0),
                                     keymesh::shm::TokenPacingOf(unlimited, 0), out_of_requests, now);
  BOOST_CHECK_EQUAL(b.cooldown_deadline, now + 2 * kNanosPerSecond);
  BOOST_CHECK_EQUAL(b.req_tat, 0u);
}
