// Self-contained HTML plots (inline SVG, no scripts or network) of training metrics.
#pragma once

#include <string>

namespace libllm {

// Reads a metrics.jsonl (lines with "step", "loss", optional "eval_loss") and writes an HTML page
// with the training loss curve and held-out evaluation points. Written to a temporary name and renamed.
void write_loss_plot(const std::string& metrics_jsonl, const std::string& html_path, const std::string& title);

}  // namespace libllm
