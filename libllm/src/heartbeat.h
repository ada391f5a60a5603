// Liveness inside long phases for `llm-spike supervise`, which takes a run as hung when neither
// its metrics log nor this heartbeat changed for --hang-seconds. Writing a checkpoint, reading a
// base model and evaluating can take longer than that on a 65B model without being stuck: the
// code that does them calls heartbeat() as it goes (per tensor written or read, per eval batch),
// from the thread doing the work, so a process stuck in I/O or a collective stops beating (a file's
// final fsync beats from beside it, for as long as 10 MB/s would take).
// Private to the library; implemented in spike.cpp.
#pragma once

#include <string_view>

namespace libllm::detail {

// The environment variable the supervisor sets for its job: the heartbeat file's path.
inline constexpr const char* kHeartbeatEnv = "LIBLLM_HEARTBEAT";

// Records that the process is doing `what` to `object` ("writing", "/runs/x/.../model.safetensors"):
// the file named by $LIBLLM_HEARTBEAT gets the time and both, at most once a second (nothing is
// built before that is known: cheap enough for every tensor read). Only in the
// process of rank 0 ($RANK, else $SLURM_PROCID, unset or 0; it writes the most of a checkpoint);
// a no-op when the
// variable is unset. Never throws (a heartbeat that cannot be written is a missing heartbeat).
void heartbeat(std::string_view what, std::string_view object = {});

}  // namespace libllm::detail
