# Debian's arm64, as 64-bit Raspberry Pi OS runs it (Pi 3, 4, 5, Zero 2): scripts/cross arm64.
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(WARREN_TRIPLET aarch64-linux-gnu)
set(WARREN_QEMU qemu-aarch64)
include(${CMAKE_CURRENT_LIST_DIR}/debian.cmake)
