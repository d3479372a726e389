#include "client/c_api/held_leases.h"

#include <algorithm>
#include <utility>

namespace keymesh::c_api {

uint64_t HeldLeases::Add(Lease lease) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t ticket = next_ticket_++;
  entries_.push_back(Entry{ticket, std::move(lease)});
  ++live_;
  return ticket;
}

std::vector<HeldLeases::Entry>::iterator HeldLeases::Find(uint64_t ticket) {
  auto it = std::lower_bound(entries_.begin(), entries_.end(), ticket,
                             [](const Entry& e, uint64_t t) { return e.ticket < t; });
  return it != entries_.end() && it->ticket == ticket ? it : entries_.end();
}

std::optional<Lease> HeldLeases::Take(std::string_view secret, uint64_t ticket) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.end();
  if (ticket != 0) {
    it = Find(ticket);
  } else {  // the oldest lease of `secret`
    it = std::find_if(entries_.begin(), entries_.end(),
                      [&](const Entry& e) { return e.lease.active() && e.lease.secret() == secret; });
  }
  if (it == entries_.end() || !it->lease.active() || it->lease.secret() != secret) return std::nullopt;
  std::optional<Lease> out(std::move(it->lease));  // leaves a hole (moved-from: inactive)
  --live_;
  Compact();
  return out;
}

void HeldLeases::Compact() {
  // The common case, one lease held and ended: the hole is the last entry.
  while (!entries_.empty() && !entries_.back().lease.active()) entries_.pop_back();
  const std::size_t holes = entries_.size() - live_;
  if (holes > 16 && holes > live_) {
    std::erase_if(entries_, [](const Entry& e) { return !e.lease.active(); });
  }
}

uint32_t HeldLeases::Count(const char* secret) {
  std::lock_guard<std::mutex> lock(mu_);
  if (secret == nullptr) return static_cast<uint32_t>(live_);
  const std::string_view s(secret);
  return static_cast<uint32_t>(std::count_if(
      entries_.begin(), entries_.end(), [&](const Entry& e) { return e.lease.active() && e.lease.secret() == s; }));
}

void HeldLeases::CancelAll() {
  std::vector<Entry> leases;
  {
    std::lock_guard<std::mutex> lock(mu_);
    leases.swap(entries_);
    live_ = 0;
  }
  // Outside the lock: ending a lease may take the pool's lock or a round
  // trip to the broker.
  for (Entry& e : leases) {
    if (e.lease.active()) (void)e.lease.Cancel();
  }
}

}  // namespace keymesh::c_api
