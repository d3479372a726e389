// Logging: one logfmt line per event on stderr
// (`ts=... level=info event=pool_created pool=openai keys=3`).
//
// Callers pass secrets only through MaskSecret(); nothing here masks for
// them. Thread-safe: each line is written with a single write(2).
#ifndef KEYMESH_BROKER_LOG_H_
#define KEYMESH_BROKER_LOG_H_

#include <initializer_list>
#include <string>
#include <string_view>

namespace keymesh::broker {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// "debug", "info", "warn", "error"; false for anything else.
bool ParseLogLevel(std::string_view text, LogLevel* level);
std::string_view LogLevelName(LogLevel level);
// Sets the level for the life of the process (the command line's
// --log-level); later SetConfigLogLevel() calls are ignored.
void SetLogLevel(LogLevel level);
// The config's `log_level`: applied unless SetLogLevel() pinned a level.
void SetConfigLogLevel(LogLevel level);
bool LogEnabled(LogLevel level);

struct LogField {
  std::string_view key;
  std::string value;
};

// Writes `ts=... level=... event=<event> k=v ...`; values with spaces,
// quotes, '=' or control characters are quoted, with '"' and '\\' escaped
// and control characters written as \n, \t, \r or \xHH, so one event is
// always one line.
void Log(LogLevel level, std::string_view event, std::initializer_list<LogField> fields = {});

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_LOG_H_
