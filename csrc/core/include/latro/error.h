// Errors of the torch-free core. Every public entry point validates its arguments and throws
// latro::Error (a std::runtime_error) naming the offending argument; callers in other runtimes
// translate it into their own error type (the torch bindings raise ValueError).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace latro {

class Error : public std::runtime_error {
 public:
  Error(const std::string& message, const char* file, int line)
      : std::runtime_error(message), file_(file), line_(line) {}
  const char* file() const noexcept { return file_; }
  int line() const noexcept { return line_; }

 private:
  const char* file_;
  int line_;
};

namespace detail {
// Builds the message from any streamable pieces: LATRO_CHECK(x > 0, "x must be positive, got ", x).
template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
}  // namespace detail

}  // namespace latro

// The message says what is wrong and with which argument; the file and line stay on the
// exception object (Error::file/line) instead of cluttering what users read.
#define LATRO_CHECK(cond, ...)                                                     \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      throw ::latro::Error(::latro::detail::concat(__VA_ARGS__), __FILE__, __LINE__); \
    }                                                                              \
  } while (0)

#define LATRO_FAIL(...) throw ::latro::Error(::latro::detail::concat(__VA_ARGS__), __FILE__, __LINE__)
