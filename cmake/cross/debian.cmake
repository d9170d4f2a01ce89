# Cross-building on Debian for another Debian architecture, the multiarch way: that
# architecture's libraries and headers are installed beside the build host's
# (dpkg --add-architecture ARCH; libfoo-dev:ARCH), the compiler is <triplet>-gcc, and
# <triplet>-pkg-config reads that architecture's .pc files. scripts/cross installs them.
#
# The file that includes this one sets CMAKE_SYSTEM_PROCESSOR, WARREN_TRIPLET (the GNU
# triplet, also the multiarch directory: /usr/lib/<triplet>) and WARREN_QEMU (qemu-user's
# program for that processor).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_C_COMPILER ${WARREN_TRIPLET}-gcc)
set(CMAKE_LIBRARY_ARCHITECTURE ${WARREN_TRIPLET})
set(PKG_CONFIG_EXECUTABLE ${WARREN_TRIPLET}-pkg-config CACHE FILEPATH
  "pkg-config for ${WARREN_TRIPLET}")

# The tests run the foreign executables under qemu-user. The dynamic loader of the target
# sits where its binaries name it (/lib/ld-linux-*.so.*), and it searches /usr/lib/<triplet>
# itself, so no -L prefix is needed.
find_program(WARREN_QEMU_PROGRAM NAMES ${WARREN_QEMU} ${WARREN_QEMU}-static)
if(WARREN_QEMU_PROGRAM)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${WARREN_QEMU_PROGRAM})
endif()
