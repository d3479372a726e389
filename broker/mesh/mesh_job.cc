#include "broker/mesh/mesh_job.h"

namespace keymesh::broker::mesh {

struct MeshJob::Impl {
  MeshConfig config;
  PoolLookup pools;
  StoreFactory store;
  mutable std::mutex mu;
  std::vector<MeshKey> keys;
};

MeshJob::MeshJob(MeshConfig config, PoolLookup pools, StoreFactory store) : impl_(std::make_unique<Impl>()) {
  impl_->config = std::move(config);
  impl_->pools = std::move(pools);
  impl_->store = std::move(store);
}
MeshJob::~MeshJob() { Stop(); }
void MeshJob::Start() {}
void MeshJob::Stop() {}
void MeshJob::SetKeys(std::vector<MeshKey> keys) {
  std::lock_guard lock(impl_->mu);
  impl_->keys = std::move(keys);
}
MeshStatus MeshJob::Status() const {
  std::lock_guard lock(impl_->mu);
  MeshStatus s;
  s.enabled = true;
  s.host = impl_->config.host;
  s.ns = impl_->config.ns;
  s.redis = impl_->config.redis.Describe();
  return s;
}

const char* MeshModeName(MeshMode mode) noexcept {
  switch (mode) {
    case MeshMode::kLeased:
      return "leased";
    case MeshMode::kLearning:
      return "learning";
    case MeshMode::kShare:
      return "share";
    case MeshMode::kClosed:
      return "closed";
    case MeshMode::kOpen:
      return "open";
  }
  return "?";
}

}  // namespace keymesh::broker::mesh
