// DiskTier's start-up scan: rebuilds the index from the block files a previous run left behind.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <stdexcept>
#include <utility>
#include <vector>

#include "rtpllm/kvstore/disk_block_file.h"
#include "rtpllm/kvstore/disk_tier.h"

namespace rtpllm {
namespace {

constexpr time_t kStaleTempFileSeconds = 600;  // older temporary files are leftovers of a crash

bool ends_with(const std::string& name, const std::string& suffix) {
  return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void make_directories(const std::string& path) {
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos != path.size() && path[pos] != '/') continue;
    const std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
      throw std::runtime_error("disk tier: cannot create directory " + prefix + ": " + std::strerror(errno));
    }
  }
}

}  // namespace

void DiskTier::scan_directory() {
  make_directories(options_.directory);
  DIR* dir = ::opendir(options_.directory.c_str());
  if (dir == nullptr) {
    throw std::runtime_error("disk tier: cannot read directory " + options_.directory + ": " + std::strerror(errno));
  }
  struct Found {
    time_t mtime;
    BlockHash hash;
  };
  std::vector<Found> found;
  size_t foreign = 0;
  HostBuffer header(std::make_shared<AlignedHostAllocator>(), kDiskBlockHeaderBytes);
  const time_t now = ::time(nullptr);
  while (const dirent* item = ::readdir(dir)) {
    const std::string name = item->d_name;
    const std::string path = options_.directory + "/" + name;
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    BlockHash hash = 0;
    if (ends_with(name, ".tmp") && name.find(".kvb.") != std::string::npos) {
      if (now - st.st_mtime > kStaleTempFileSeconds) ::unlink(path.c_str());
      continue;
    }
    if (!parse_block_file_name(name, &hash)) continue;  // not ours: leave it alone
    size_t file_size = 0;
    const int error = read_file_prefix(path, header.data(), kDiskBlockHeaderBytes, &file_size);
    DiskBlockCheck check = error != 0 || file_size < kDiskBlockHeaderBytes
                               ? DiskBlockCheck::TRUNCATED
                               : check_block_header(header.data(), options_.cache_identity, hash, payload_bytes_);
    if (check == DiskBlockCheck::OK && file_size < file_bytes_) check = DiskBlockCheck::TRUNCATED;
    if (check == DiskBlockCheck::FOREIGN) {
      ++foreign;  // another model's cache sharing the directory: not ours to judge or delete
      continue;
    }
    if (check != DiskBlockCheck::OK) {
      warn("disk tier: block file " + path + " is unusable (" + to_string(check) + "); deleted");
      ::unlink(path.c_str());
      continue;
    }
    found.push_back(Found{st.st_mtime, hash});
  }
  ::closedir(dir);
  if (foreign > 0) {
    warn("disk tier: ignored " + std::to_string(foreign) + " block file(s) of another cache identity in " +
            options_.directory);
  }

  // Oldest first, so the LRU order approximates the previous run's.
  std::sort(found.begin(), found.end(), [](const Found& a, const Found& b) { return a.mtime < b.mtime; });
  std::lock_guard<std::mutex> lock(mutex_);
  for (const Found& file : found) {
    insert_entry(file.hash);
    used_bytes_ += static_cast<int64_t>(file_bytes_);
  }
  while (used_bytes_ > options_.capacity_bytes && !lru_.empty()) {  // the capacity shrank since
    remove_entry(lru_.front(), true);
    ++stats_.evicted_blocks;
  }
}

}  // namespace rtpllm
