// keymesh-broker: the command line over the broker library.
#include <cstdio>
#include <cstring>
#include <string>

#include "broker/broker.h"
#include "broker/config.h"
#include "broker/hardening.h"
#include "broker/log.h"

namespace {
constexpr const char* kUsage =
    "usage: keymesh-broker --config FILE [--check] [--discard-state] [--log-level debug|info|warn|error]\n";
}

int main(int argc, char** argv) {
  keymesh::broker::BrokerOptions options;
  bool check = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    keymesh::broker::LogLevel level;
    if (arg == "--config" && i + 1 < argc) {
      options.config_path = argv[++i];
    } else if (arg == "--check") {
      check = true;
    } else if (arg == "--discard-state") {
      options.discard_state = true;
    } else if (arg == "--log-level" && i + 1 < argc && keymesh::broker::ParseLogLevel(argv[i + 1], &level)) {
      keymesh::broker::SetLogLevel(level);
      ++i;
    } else if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else {
      std::fprintf(stderr, "keymesh-broker: bad argument '%s'\n%s", arg.c_str(), kUsage);
      return 2;
    }
  }
  if (options.config_path.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  // Before any secret is read (the config names them): no core dump, no
  // same-uid ptrace or /proc/PID/mem.
  if (keymesh::Status st = keymesh::broker::ProtectProcessMemory(); !st.ok()) {
    std::fprintf(stderr, "keymesh-broker: %s\n", st.message().c_str());
    return 1;
  }
  if (check) {
    keymesh::Result<keymesh::broker::BrokerConfig> config = keymesh::broker::LoadConfig(options.config_path);
    if (!config.ok()) {
      std::fprintf(stderr, "%s\n", config.status().message().c_str());
      return 1;
    }
    size_t keys = 0;
    for (const auto& p : config->pools) keys += p.keys.size();
    std::printf("config OK: %zu pools, %zu keys\n", config->pools.size(), keys);
    return 0;
  }
  // KM-15: a broker that cannot see its workers in /proc must not start.
  if (keymesh::Status st = keymesh::broker::CheckProcVisibility(); !st.ok()) {
    std::fprintf(stderr, "keymesh-broker: %s\n", st.message().c_str());
    return 1;
  }
  keymesh::broker::Broker broker(std::move(options));
  return broker.Run();
}
