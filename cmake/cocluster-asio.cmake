# Finds standalone Asio by its header (Debian's libasio-dev has no CMake or pkg-config file) and
# makes the INTERFACE target cocluster::asio. Another Asio: -DCOCLUSTER_ASIO_INCLUDE_DIR=path.
# Asio's own configuration macros (ASIO_NO_DEPRECATED, ...) are left to the user.
if(NOT TARGET cocluster::asio)
  find_path(COCLUSTER_ASIO_INCLUDE_DIR asio.hpp DOC "Directory holding standalone Asio's asio.hpp")
  if(NOT COCLUSTER_ASIO_INCLUDE_DIR)
    message(FATAL_ERROR "cocluster: standalone Asio not found (on Debian: apt-get install libasio-dev; "
                        "elsewhere: -DCOCLUSTER_ASIO_INCLUDE_DIR=<dir holding asio.hpp>)")
  endif()
  add_library(cocluster::asio INTERFACE IMPORTED GLOBAL)
  set_target_properties(cocluster::asio PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${COCLUSTER_ASIO_INCLUDE_DIR}")
endif()
