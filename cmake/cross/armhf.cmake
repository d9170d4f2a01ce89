# Debian's armhf, ARMv7-A with hard float, as 32-bit Raspberry Pi OS runs it on a Pi 2, 3, 4,
# 5 or Zero 2: scripts/cross armhf. (A Pi 1 or Zero is ARMv6, below Debian's armhf.)
set(CMAKE_SYSTEM_PROCESSOR armv7l)
set(WARREN_TRIPLET arm-linux-gnueabihf)
set(WARREN_QEMU qemu-arm)
include(${CMAKE_CURRENT_LIST_DIR}/debian.cmake)
