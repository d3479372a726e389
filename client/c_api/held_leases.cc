#include "client/c_api/held_leases.h"

#include <unordered_map>

namespace keymesh::c_api {

uint64_t HeldLeases::Add(Lease lease) {
  std::string secret = lease.secret();
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t ticket = next_ticket_++;
  by_secret_[std::move(secret)].push_back(ticket);
  by_ticket_.emplace(ticket, std::move(lease));
  return ticket;
}

std::optional<Lease> HeldLeases::Take(std::string_view secret, uint64_t ticket) {
  std::lock_guard<std::mutex> lock(mu_);
  auto sit = by_secret_.find(secret);
  if (sit == by_secret_.end()) return std::nullopt;
  std::deque<uint64_t>& queue = sit->second;
  auto qit = queue.begin();
  if (ticket != 0) {
    while (qit != queue.end() && *qit != ticket) ++qit;
  }
  if (qit == queue.end()) return std::nullopt;
  std::optional<Lease> out;
  if (auto hit = by_ticket_.find(*qit); hit != by_ticket_.end()) {
    out.emplace(std::move(hit->second));
    by_ticket_.erase(hit);
  }
  queue.erase(qit);
  if (queue.empty()) by_secret_.erase(sit);
  return out;
}

uint32_t HeldLeases::Count(const char* secret) {
  std::lock_guard<std::mutex> lock(mu_);
  if (secret == nullptr) return static_cast<uint32_t>(by_ticket_.size());
  auto it = by_secret_.find(std::string_view(secret));
  return it == by_secret_.end() ? 0 : static_cast<uint32_t>(it->second.size());
}

void HeldLeases::CancelAll() {
  std::unordered_map<uint64_t, Lease> leases;
  {
    std::lock_guard<std::mutex> lock(mu_);
    leases.swap(by_ticket_);
    by_secret_.clear();
  }
  // Outside the lock: ending a lease may take the pool's lock or a round
  // trip to the broker.
  for (auto& [ticket, lease] : leases) (void)lease.Cancel();
}

}  // namespace keymesh::c_api
