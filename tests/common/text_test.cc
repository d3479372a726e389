// Quoting of input into messages: one line, control characters visible.
#define BOOST_TEST_MODULE common_text
#include "common/text.h"

#include <string>

#include <boost/test/unit_test.hpp>

namespace km = keymesh;

BOOST_AUTO_TEST_CASE(escaped_writes_control_characters_visibly) {
  BOOST_CHECK_EQUAL(km::Escaped("plain-name_1.2"), "plain-name_1.2");
  BOOST_CHECK_EQUAL(km::Escaped("a\nb\tc\rd"), "a\\nb\\tc\\rd");
  BOOST_CHECK_EQUAL(km::Escaped(std::string("x\0y", 3)), "x\\x00y");
  BOOST_CHECK_EQUAL(km::Escaped("\x1b[2J\x7f"), "\\x1b[2J\\x7f");
  BOOST_CHECK_EQUAL(km::Escaped("back\\slash"), "back\\\\slash");
  BOOST_CHECK_EQUAL(km::Escaped("caf\xc3\xa9"), "caf\xc3\xa9");  // UTF-8 stays readable
}

BOOST_AUTO_TEST_CASE(quoted_adds_quotes_and_escapes_them) {
  BOOST_CHECK_EQUAL(km::Quoted("team-a"), "'team-a'");
  BOOST_CHECK_EQUAL(km::Quoted("max_concurr\ncy"), "'max_concurr\\ncy'");
  BOOST_CHECK_EQUAL(km::Quoted("it's"), "'it\\'s'");
  BOOST_CHECK_EQUAL(km::Quoted(""), "''");
}

BOOST_AUTO_TEST_CASE(one_line_keeps_backslashes_of_a_formed_message) {
  BOOST_CHECK_EQUAL(km::OneLine("no pool 'a\\nb'"), "no pool 'a\\nb'");
  BOOST_CHECK_EQUAL(km::OneLine("two\nlines"), "two\\nlines");
  BOOST_CHECK(!km::HasControl(km::OneLine("\x01\x02\n\r\t")));
  BOOST_CHECK(km::HasControl("a\nb"));
  BOOST_CHECK(!km::HasControl("a\\nb"));
}

BOOST_AUTO_TEST_CASE(hex_is_two_lower_case_digits_per_byte) {
  BOOST_CHECK_EQUAL(km::Hex(std::string_view("\x00\x0f\xa5\xff", 4)), "000fa5ff");
  BOOST_CHECK_EQUAL(km::Hex(""), "");
}
