#pragma once
#include <stdexcept>
#define C10_THROW_ERROR(kind, msg) throw std::runtime_error(msg)
