// Package rawfs makes the few file system calls that an idle agent makes
// periodically (the data path's check of its pins, the process series of
// a scrape) without allocating: paths kept NUL-terminated, directories
// read into a buffer the caller keeps. What an idle agent allocates stays
// resident until its next collection, which at its small heap can be
// minutes away. Linux only.
package rawfs
