// Processes in tests: fork a child that runs a function, wait for it, kill it
// on every exit path, talk to it over a pipe, share counters with it, read
// CPU time. One copy for every suite (linked as keymesh_test_support).
#ifndef KEYMESH_TESTS_SUPPORT_PROCESS_H_
#define KEYMESH_TESTS_SUPPORT_PROCESS_H_

#include <sys/mman.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <new>
#include <string>
#include <vector>

namespace keymesh::testing {

// Forks; the child runs `fn` and _exits with its return value (99 if it
// threw). Flushes stdio first so the child does not repeat buffered output.
// Returns the child's pid to the parent.
pid_t ForkChild(const std::function<int()>& fn);

// Forks and execs `argv` (argv[0] searched in PATH when it has no '/'),
// with `out_fd` and `err_fd`, when >= 0, as the child's stdout and stderr.
// Everything the child needs is built before the fork: between fork and exec
// it only calls dup2 and exec, so a test may run threads when it spawns (a
// child forked from a multi-threaded process may inherit a lock held
// mid-operation, ThreadSanitizer's allocator lock among them). The child
// _exits 127 if exec fails. Returns its pid, or -1 if fork failed.
pid_t SpawnProgram(const std::vector<std::string>& argv, int out_fd = -1, int err_fd = -1);

// Waits for `pid` (retrying on EINTR); its exit code (0..255), 128 + the
// signal when killed, -1 on error. *core_dumped (if given) says whether the
// kernel wrote a core dump.
int WaitChild(pid_t pid, bool* core_dumped = nullptr);

// Kills and reaps a child still running when the scope ends (a failed test
// leaves nothing behind).
class ChildGuard {
 public:
  explicit ChildGuard(pid_t pid) : pid(pid) {}
  ~ChildGuard();
  ChildGuard(const ChildGuard&) = delete;
  ChildGuard& operator=(const ChildGuard&) = delete;
  int Wait();
  int KillAndWait();

  pid_t pid = -1;
};

// A pipe whose ends close on destruction: a one-shot or streaming signal
// between a parent and its forked children.
class Pipe {
 public:
  Pipe();
  ~Pipe();
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  void CloseRead();
  void CloseWrite();
  // Writes / reads exactly n bytes (retrying on EINTR); false on error or
  // EOF (the other side died first).
  bool Write(const void* data, size_t n);
  bool Read(void* data, size_t n);
  template <typename T>
  bool Put(const T& v) {
    return Write(&v, sizeof(T));
  }
  template <typename T>
  bool Get(T* v) {
    return Read(v, sizeof(T));
  }
  // Waits up to `timeout` seconds for one byte; the byte, or 0 on timeout
  // or EOF.
  char WaitByte(double timeout);
  // The write end's descriptor (for code that must write from a signal-safe
  // context, e.g. a crash hook); -1 once closed.
  int write_fd() const noexcept { return fds_[1]; }

 private:
  int fds_[2] = {-1, -1};
};

// A one-shot cross-process signal.
class Latch {
 public:
  void Notify(char c = '1') { (void)pipe_.Put(c); }  // from any process
  // Waits for one byte; returns it, or 0 on timeout/EOF.
  char Wait(double timeout) { return pipe_.WaitByte(timeout); }

 private:
  Pipe pipe_;
};

// Memory shared with forked children (MAP_SHARED | MAP_ANONYMOUS), for
// counters the children report through.
template <typename T>
class SharedArray {
 public:
  explicit SharedArray(size_t count) : n_(count) {
    void* p = ::mmap(nullptr, sizeof(T) * count, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    data_ = static_cast<T*>(p);
    for (size_t i = 0; i < count; ++i) new (&data_[i]) T();
  }
  ~SharedArray() { ::munmap(data_, sizeof(T) * n_); }
  SharedArray(const SharedArray&) = delete;
  SharedArray& operator=(const SharedArray&) = delete;
  T& operator[](size_t i) { return data_[i]; }

 private:
  T* data_ = nullptr;
  size_t n_ = 0;
};

// CPU time of the calling process in nanoseconds.
uint64_t ProcessCpuNanos();
// CLOCK_MONOTONIC in seconds.
double NowSeconds();

}  // namespace keymesh::testing

#endif  // KEYMESH_TESTS_SUPPORT_PROCESS_H_
