// The broker-backed halves of keymesh::Pool (Pool::Connect):
//
//   BrokerAdmin   key changes over the socket: the broker owns the keys
//                 and knows their secrets
//   AttachedPool  a LocalPool on the broker's segment (the fast path) whose
//                 key changes go through a BrokerAdmin
//   RemotePool    the socket slow path, when the segment cannot be mapped:
//                 leases too are granted and ended by the broker
//
// All socket I/O goes through protocol::ControlClient, the one client of the
// control protocol (shared with keymeshctl and km_broker_reclaim).
#ifndef KEYMESH_CLIENT_REMOTE_POOL_H_
#define KEYMESH_CLIENT_REMOTE_POOL_H_

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "client/local_pool.h"
#include "client/pool_backend.h"
#include "protocol/control_client.h"

namespace keymesh::detail {

// Pool::Connect: an AttachedPool when the broker's segment can be mapped
// (and KEYMESH_SLOW_PATH is not set), else a RemotePool.
Result<std::unique_ptr<PoolBackend>> ConnectBackend(std::string_view socket_path, std::string_view pool_name);

// A control client for one pool of one broker: every connection it dials
// says hello with this process's identity (recomputed after fork) and the
// pool, so leases granted over it belong to this process.
struct BrokerChannel {
  std::shared_ptr<protocol::ControlClient> client;
  std::string pool;
};

// name -> secret of every key of the channel's pool (the peer must be allowed).
Result<Secrets> FetchSecrets(const BrokerChannel& channel);
// The channel's pool's status.
Result<PoolStatus> FetchStatus(const BrokerChannel& channel);

// Key changes through the broker, for the backend `owner`: a key without a
// name re-admits the one `owner` knows by its secret (the original
// identified keys by their secret), and `owner` learns a new key's secret
// at once. Thread safety: any thread (the control client borrows a
// connection per call). `owner` outlives it.
class BrokerAdmin final : public KeyAdmin {
 public:
  BrokerAdmin(BrokerChannel channel, PoolBackend& owner) : channel_(std::move(channel)), owner_(owner) {}

  const BrokerChannel& channel() const noexcept { return channel_; }
  protocol::ControlClient& client() const noexcept { return *channel_.client; }
  const std::string& pool() const noexcept { return channel_.pool; }

  Status AddKey(const KeySpec& key) override;
  Status RemoveKey(std::string_view name) override { return KeyOp(protocol::Op::kRemoveKey, name); }
  Status SetEnabled(std::string_view name, bool enabled) override {
    return KeyOp(enabled ? protocol::Op::kEnable : protocol::Op::kDisable, name);
  }
  Status ResetKey(std::string_view name) override { return KeyOp(protocol::Op::kReset, name); }
  // The broker reaps dead holders itself (connection EOF, pidfd).
  Result<uint32_t> ReclaimDead() override;

 private:
  Status KeyOp(protocol::Op op, std::string_view name);

  const BrokerChannel channel_;
  PoolBackend& owner_;
};

class AttachedPool final : public LocalPool {
 public:
  // `secrets`: what the broker just sent (Connect fetched them first).
  AttachedPool(std::unique_ptr<shm::Segment> segment, uint32_t pool_index, const BrokerChannel& channel,
               const Secrets& secrets);

  KeyAdmin& keys() noexcept override { return admin_; }

 private:
  BrokerAdmin admin_;
};

class RemotePool final : public PoolBackend {
 public:
  // `secrets`: what the broker just sent (Connect fetched them first).
  RemotePool(const BrokerChannel& channel, const Secrets& secrets);

  const std::string& name() const noexcept override { return admin_.pool(); }
  bool slow_path() const noexcept override { return true; }

  Result<Lease> Acquire(const Pool::AcquireOptions& options) override;
  Result<Lease> TryAcquire() override;
  Status End(const LeaseRef& lease, OutcomeKind kind, const Lease::EndOptions& options) override;
  Status ObserveLimits(std::string_view key_name, const LimitObservation& observation) override;
  void WakeWaiters() noexcept override {}  // the waits are the broker's

  KeyAdmin& keys() noexcept override { return admin_; }
  Status RefreshSecrets() override;

  Result<PoolStatus> GetStatus() override { return FetchStatus(admin_.channel()); }
  uint32_t AvailableCount() override;
  std::optional<std::string> NameOfSecret(std::string_view secret) override;
  // Slots are the broker's: status output shows "***" for the secret.
  std::optional<std::string> MaskedSecretOfSlot(uint32_t) override { return std::nullopt; }
  void SetSelector(std::shared_ptr<const Selector> selector) override;

 private:
  Result<Lease> AcquireOver(std::optional<double> timeout, uint64_t tokens);
  void LearnSecrets(const Secrets& secrets);
  // What this process knows of key `name`, refreshed once from the broker
  // when unknown. The pointer lives as long as this backend.
  const KeyEntry* Entry(const std::string& name);

  BrokerAdmin admin_;
  std::mutex entries_mu_;
  std::map<std::string, const KeyEntry*, std::less<>> entries_;  // guarded by entries_mu_
  std::vector<std::unique_ptr<KeyEntry>> storage_;               // guarded by entries_mu_; leases point here
};

}  // namespace keymesh::detail

#endif  // KEYMESH_CLIENT_REMOTE_POOL_H_
