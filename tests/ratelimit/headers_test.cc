// Parsing of Retry-After and x-ratelimit-* headers: every format providers
// send, and garbage rejected without crashing.
#define BOOST_TEST_MODULE rate_limit_headers
#include <boost/test/unit_test.hpp>

#include "keymesh/rate_limit_headers.h"

using keymesh::ParseLimitHeaders;
using keymesh::ParseRateLimitDuration;
using keymesh::ParseRetryAfter;

namespace {
constexpr double kNow = 1445412480.0;  // Wed, 21 Oct 2015 07:28:00 GMT
}

BOOST_AUTO_TEST_CASE(retry_after_seconds) {
  BOOST_TEST(*ParseRetryAfter("120", kNow) == 120.0);
  BOOST_TEST(*ParseRetryAfter(" 0 ", kNow) == 0.0);
  BOOST_TEST(*ParseRetryAfter("1.5", kNow) == 1.5);
}

BOOST_AUTO_TEST_CASE(retry_after_http_dates) {
  BOOST_TEST(*ParseRetryAfter("Wed, 21 Oct 2015 07:28:30 GMT", kNow) == 30.0);
  BOOST_TEST(*ParseRetryAfter("Wednesday, 21-Oct-15 07:29:00 GMT", kNow) == 60.0);
  BOOST_TEST(*ParseRetryAfter("Wed Oct 21 07:28:10 2015", kNow) == 10.0);
  // A date in the past means "now".
  BOOST_TEST(*ParseRetryAfter("Wed, 21 Oct 2015 07:00:00 GMT", kNow) == 0.0);
}

BOOST_AUTO_TEST_CASE(retry_after_garbage) {
  for (const char* bad :
       {"", "soon", "-5", "1e3", "12abc", "Wed, 32 Oct 2015 07:28:00 GMT", "Wed, 21 Foo 2015 07:28:00 GMT",
        "Wed, 21 Oct 2015 07:28:00 PST", "nan", "inf", "1.2.3", "Wed, 21 Oct 2015 25:28:00 GMT"}) {
    BOOST_TEST_INFO("value: '" << bad << "'");
    auto r = ParseRetryAfter(bad, kNow);
    BOOST_TEST(!r.ok());
    BOOST_TEST((r.status().code() == keymesh::Code::kInvalidArgument));
  }
}

BOOST_AUTO_TEST_CASE(durations) {
  BOOST_TEST(*ParseRateLimitDuration("1s") == 1.0);
  BOOST_TEST(*ParseRateLimitDuration("6m0s") == 360.0);
  BOOST_TEST(*ParseRateLimitDuration("250ms") == 0.25, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(*ParseRateLimitDuration("1h2m3.5s") == 3723.5);
  BOOST_TEST(*ParseRateLimitDuration("20us") == 20e-6, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(*ParseRateLimitDuration("7") == 7.0);
  BOOST_TEST(*ParseRateLimitDuration("59.5ms") == 0.0595, boost::test_tools::tolerance(1e-12));
  for (const char* bad : {"", "s", "1x", "m5", "1s2", "--", "1..2s", "1 s", "999999999999999999999999999999999h"}) {
    BOOST_TEST_INFO("value: '" << bad << "'");
    BOOST_TEST(!ParseRateLimitDuration(bad).ok());
  }
}

BOOST_AUTO_TEST_CASE(header_sets) {
  auto obs = ParseLimitHeaders({{"X-RateLimit-Limit-Requests", "500"},
                                {"x-ratelimit-remaining-requests", "499"},
                                {"x-ratelimit-reset-requests", "120ms"},
                                {"x-ratelimit-limit-tokens", "200000"},
                                {"x-ratelimit-remaining-tokens", "199000"},
                                {"x-ratelimit-reset-tokens", "6m0s"},
                                {"content-type", "application/json"},
                                {"Retry-After", "2"}},
                               kNow);
  BOOST_REQUIRE(obs.ok());
  BOOST_TEST(*obs->limit_requests == 500u);
  BOOST_TEST(*obs->remaining_requests == 499u);
  BOOST_TEST(*obs->reset_requests == 0.12, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(*obs->limit_tokens == 200000u);
  BOOST_TEST(*obs->remaining_tokens == 199000u);
  BOOST_TEST(*obs->reset_tokens == 360.0);
  BOOST_TEST(*obs->retry_after == 2.0);

  auto ms = ParseLimitHeaders({{"retry-after", "5"}, {"retry-after-ms", "1500"}}, kNow);
  BOOST_TEST(*ms->retry_after == 1.5);
  auto none = ParseLimitHeaders({{"server", "x"}}, kNow);
  BOOST_TEST(none->empty());
}

BOOST_AUTO_TEST_CASE(header_garbage_names_the_header_not_the_value) {
  auto bad = ParseLimitHeaders({{"x-ratelimit-remaining-requests", "lots sk-secret"}}, kNow);
  BOOST_REQUIRE(!bad.ok());
  BOOST_TEST(bad.status().message().find("x-ratelimit-remaining-requests") != std::string::npos);
  BOOST_TEST(bad.status().message().find("sk-secret") == std::string::npos);
  BOOST_TEST(!ParseLimitHeaders({{"x-ratelimit-remaining-tokens", "-1"}}, kNow).ok());
  BOOST_TEST(!ParseLimitHeaders({{"x-ratelimit-reset-tokens", "soon"}}, kNow).ok());
  BOOST_TEST(!ParseLimitHeaders({{"retry-after-ms", "1e3"}}, kNow).ok());
  // Arbitrary bytes never crash.
  std::string junk;
  for (int i = 0; i < 256; ++i) junk.push_back(static_cast<char>(i));
  for (const char* name : {"retry-after", "x-ratelimit-reset-requests", "x-ratelimit-remaining-requests"}) {
    BOOST_TEST(!ParseLimitHeaders({{name, junk}}, kNow).ok());
  }
}
