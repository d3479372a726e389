#include "broker/log.h"

#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>

#include "common/text.h"
#include "shm/clock.h"

namespace keymesh::broker {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<bool> g_pinned{false};

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kError: return "error";
  }
  return "info";
}

void AppendValue(std::string* out, std::string_view v) {
  bool quote = v.empty();
  for (char c : v)
    quote = quote || c == ' ' || c == '"' || c == '=' || c == '\\' || static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
  if (!quote) {
    out->append(v);
    return;
  }
  out->push_back('"');
  AppendEscaped(out, v, '"');
  out->push_back('"');
}

}  // namespace

bool ParseLogLevel(std::string_view text, LogLevel* level) {
  for (LogLevel l : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarn, LogLevel::kError}) {
    if (text == LevelName(l)) {
      *level = l;
      return true;
    }
  }
  return false;
}

std::string_view LogLevelName(LogLevel level) { return LevelName(level); }

void SetLogLevel(LogLevel level) {
  g_level.store(static_cast<int>(level), std::memory_order_relaxed);
  g_pinned.store(true, std::memory_order_relaxed);
}

void SetConfigLogLevel(LogLevel level) {
  if (!g_pinned.load(std::memory_order_relaxed)) g_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= g_level.load(std::memory_order_relaxed); }

void Log(LogLevel level, std::string_view event, std::initializer_list<LogField> fields) {
  if (!LogEnabled(level)) return;
  const uint64_t wall = shm::WallNowNanos();
  const time_t sec = static_cast<time_t>(wall / shm::kNanosPerSecond);
  struct tm tm;
  gmtime_r(&sec, &tm);
  char stamp[64];
  std::snprintf(stamp, sizeof(stamp), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(wall % shm::kNanosPerSecond / 1'000'000));
  std::string line = "ts=";
  line += stamp;
  line += " level=";
  line += LevelName(level);
  line += " event=";
  AppendValue(&line, event);
  for (const LogField& f : fields) {
    line.push_back(' ');
    line.append(f.key);
    line.push_back('=');
    AppendValue(&line, f.value);
  }
  line.push_back('\n');
  ssize_t n = ::write(STDERR_FILENO, line.data(), line.size());
  (void)n;
}

}  // namespace keymesh::broker
