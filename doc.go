// Package mantlet is the root of the mantlet service mesh module. The code
// lives in its subpackages; see README.md and docs/ for the map.
package mantlet
