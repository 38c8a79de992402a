#include "common/prefetch.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace ktrans {
namespace {

constexpr int64_t kDefault = 1024;

// NOTE: read during static initialisation, where throwing would abort the process: a bad value
// keeps the default and is reported by check_prefetch_env() (ktrans.cpu calls it at import).
std::string& env_error() {
  static std::string e;
  return e;
}

int64_t distance_from_env() {
  const char* v = std::getenv("KTRANS_PREFETCH_AHEAD");
  if (v == nullptr || *v == '\0') return kDefault;
  char* end = nullptr;
  const long long d = std::strtoll(v, &end, 10);
  if (*end != '\0' || d < 0 || d > (1 << 20) || d % 64 != 0) {
    env_error() = std::string("KTRANS_PREFETCH_AHEAD='") + v +
                  "': expected a byte distance, a multiple of 64 from 0 (off) to 1048576";
    return kDefault;
  }
  return d;
}

}  // namespace

const int64_t g_prefetch_ahead = distance_from_env();

int64_t check_prefetch_env() {
  if (!env_error().empty()) throw std::invalid_argument(env_error());
  return g_prefetch_ahead;
}

}  // namespace ktrans
